"""The oras Python client (PyPI `oras`), as tests/artifacts.rs drives it.

  push <host:port> <repo:tag> <file> <media type> [<subject digest> <size> <media type>]
  pull <host:port> <repo:tag or repo@digest> <outdir>

Prints one JSON line: what the registry said, or the files written.
"""
import json
import os
import sys

import oras.client
import oras.oci


def main():
    cmd, host, target = sys.argv[1:4]
    client = oras.client.OrasClient(hostname=host, insecure=True)
    if cmd == "push":
        path, media_type = sys.argv[4:6]
        subject = None
        if len(sys.argv) > 6:
            digest, size, subject_type = sys.argv[6:9]
            subject = oras.oci.Subject(mediaType=subject_type, digest=digest, size=int(size))
        os.chdir(os.path.dirname(path))
        resp = client.push(
            target=f"{host}/{target}",
            files=[f"{os.path.basename(path)}:{media_type}"],
            subject=subject,
        )
        print(json.dumps({"status": resp.status_code, "location": resp.headers.get("Location")}))
    elif cmd == "pull":
        outdir = sys.argv[4]
        files = client.pull(target=f"{host}/{target}", outdir=outdir)
        print(json.dumps({"files": files}))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
