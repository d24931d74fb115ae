//! A private containerd for tests (its own root, state and socket, no CRI), and the
//! `hosts.toml` that points it at a wharf.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::Wharf;

pub struct Containerd {
    child: Child,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Containerd {
    pub fn start() -> Containerd {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("c.sock");
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\naddress = \"{}\"\n",
                sock.display()
            ),
        )
        .expect("config");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--address")
            .arg(&sock)
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("containerd runs (apt-get install containerd)");
        let c = Containerd { child, sock, dir };
        super::wait_for(30, "containerd to serve", || c.ctr(&["version"]).status.success().then_some(()));
        c
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("300")
            .arg("ctr")
            .arg("--address")
            .arg(&self.sock)
            .args(["--namespace", "wharf-test"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr runs")
    }

    /// `ctr images pull` of `reference` (linux/amd64) with the mirrors of `hosts`.
    pub fn pull_amd64(&self, hosts: &Path, reference: &str) -> Output {
        self.pull(hosts, reference, &["--platform", "linux/amd64"])
    }

    /// `ctr images pull` of `reference` with the mirrors of `hosts`, unpacked by the
    /// native snapshotter, for the platforms `platforms` (ctr's flags) choose.
    pub fn pull(&self, hosts: &Path, reference: &str, platforms: &[&str]) -> Output {
        let hosts = hosts.to_str().expect("utf-8 path");
        let mut args = vec!["images", "pull", "--hosts-dir", hosts, "--snapshotter", "native"];
        args.extend_from_slice(platforms);
        args.push(reference);
        self.ctr(&args)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        super::stop_child(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "{}",
                std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
            );
        }
    }
}

/// A `hosts.toml` directory naming wharf as the only mirror of `registry`, whose own server
/// is unreachable: a pull can only succeed through wharf.
pub fn hosts_dir(root: &Path, registry: &str, wharf: &Wharf) -> PathBuf {
    let dir = root.join("hosts.d");
    std::fs::create_dir_all(dir.join(registry)).expect("mkdir");
    std::fs::write(
        dir.join(registry).join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:1\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            wharf.host()
        ),
    )
    .expect("hosts.toml");
    dir
}
