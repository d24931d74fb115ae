#!/usr/bin/env python3
"""Write a seeded synthetic OCI image layout for the benchmark (Python stdlib only).

One image index holds an image per platform; each image has a config and one gzip tar
layer per size given, filled with seeded random bytes (incompressible, so gzip runs at
level 0). Optionally a buildx-style attestation manifest per image is added. The same
arguments give the same digests. Prints a JSON summary on stdout.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import random
import tarfile

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CHUNK = 1 << 20


def size_of(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


class Hashing(io.RawIOBase):
    """A sink that hashes what passes and forwards it to a file."""

    def __init__(self, out):
        self.out, self.sha, self.n = out, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, b):
        self.sha.update(b)
        self.out.write(b)
        self.n += len(b)
        return len(b)


class Layout:
    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)

    def path(self, digest):
        return os.path.join(self.root, "blobs", "sha256", digest.split(":", 1)[1])

    def put(self, data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(self.path(digest), "wb") as f:
            f.write(data)
        return {"digest": digest, "size": len(data)}

    def put_json(self, obj, media_type):
        return dict(self.put(json.dumps(obj, separators=(",", ":")).encode()), mediaType=media_type)

    def layer(self, seed, size):
        """A tar.gz with one file of `size` random bytes, streamed: returns (descriptor, diff_id)."""
        rng = random.Random(seed)
        tmp = os.path.join(self.root, "layer.tmp")
        with open(tmp, "wb") as f:
            gz_sink = Hashing(f)
            with gzip.GzipFile(fileobj=gz_sink, mode="wb", compresslevel=0, mtime=0) as gz:
                tar_sink = Hashing(gz)
                info = tarfile.TarInfo(f"payload/{seed}.bin")
                info.size, info.mode, info.mtime = size, 0o644, 0
                tar_sink.write(info.tobuf(format=tarfile.GNU_FORMAT))
                left = size
                while left:
                    n = min(CHUNK, left)
                    tar_sink.write(rng.randbytes(n))
                    left -= n
                pad = (512 - size % 512) % 512
                tar_sink.write(b"\0" * (pad + 1024))  # block padding + end of archive
        digest = "sha256:" + gz_sink.sha.hexdigest()
        os.replace(tmp, self.path(digest))
        desc = {"mediaType": OCI_LAYER, "digest": digest, "size": gz_sink.n}
        return desc, "sha256:" + tar_sink.sha.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="layout directory (created)")
    ap.add_argument("--seed", required=True)
    ap.add_argument("--sizes", default="4K,1M", help="layer payload sizes, e.g. 4K,64K,1M,1G")
    ap.add_argument("--platforms", default="linux/amd64,linux/arm64")
    ap.add_argument("--attestations", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tag", default="img", help="ref name in index.json")
    a = ap.parse_args()
    lay = Layout(a.out)
    entries, summary = [], {"images": {}}
    for platform in a.platforms.split(","):
        os_name, arch = platform.split("/")[:2]
        layers, diff_ids = [], []
        for i, s in enumerate(a.sizes.split(",")):
            desc, diff = lay.layer(f"{a.seed}/{platform}/{i}", size_of(s))
            layers.append(desc)
            diff_ids.append(diff)
        config = lay.put_json({"architecture": arch, "os": os_name, "config": {"Labels": {"seed": a.seed}},
                               "rootfs": {"type": "layers", "diff_ids": diff_ids}}, OCI_CONFIG)
        manifest = lay.put_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                                 "layers": layers}, OCI_MANIFEST)
        entries.append(dict(manifest, platform={"architecture": arch, "os": os_name}))
        summary["images"][platform] = {"manifest": manifest["digest"], "layers": [l["digest"] for l in layers]}
        if a.attestations:
            statement = lay.put(json.dumps({"_type": "https://in-toto.io/Statement/v0.1",
                                            "predicateType": "https://spdx.dev/Document",
                                            "subject": [{"digest": {"sha256": manifest["digest"][7:]}}]}).encode())
            att_config = lay.put_json({"architecture": "unknown", "os": "unknown", "config": {},
                                       "rootfs": {"type": "layers", "diff_ids": [statement["digest"]]}}, OCI_CONFIG)
            att = lay.put_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": att_config,
                                "layers": [dict(statement, mediaType="application/vnd.in-toto+json")]}, OCI_MANIFEST)
            entries.append(dict(att, platform={"architecture": "unknown", "os": "unknown"},
                                annotations={"vnd.docker.reference.digest": manifest["digest"],
                                             "vnd.docker.reference.type": "attestation-manifest"}))
    index = lay.put_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, OCI_INDEX)
    with open(os.path.join(a.out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [dict(index, annotations={
            "org.opencontainers.image.ref.name": a.tag})]}, f)
    summary["index"] = index["digest"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
