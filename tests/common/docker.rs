//! A private docker daemon for tests: its own data root, exec root and socket, no
//! iptables and no bridge, so it neither needs nor touches the host's docker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub fn docker_bin() -> &'static str {
    // Debian's client matches Debian's daemon; another one may be earlier on PATH.
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// A private docker daemon (its own root, socket and exec root) with `args`.
pub struct Dockerd {
    child: Child,
    dir: PathBuf,
    sock: String,
}

impl Dockerd {
    pub fn start(dir: &Path, args: &[&str]) -> Dockerd {
        std::fs::create_dir_all(dir).expect("mkdir");
        let sock = format!("unix://{}/d.sock", dir.display());
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("log");
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args([
                "-H",
                &sock,
                "--storage-driver=vfs",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("dockerd runs (apt-get install docker.io)");
        let d = Dockerd { child, dir: dir.to_path_buf(), sock };
        super::wait_for(60, "dockerd to serve", || d.docker(&["version"]).status.success().then_some(()));
        d
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("300")
            .arg(docker_bin())
            .args(["-H", &self.sock])
            .args(args)
            // `docker build` with BuildKit, which skips stages the target does not use.
            .env("DOCKER_BUILDKIT", "1")
            .stdin(Stdio::null())
            .output()
            .expect("docker runs")
    }

    /// `docker args`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        super::succeeded(&self.docker(args), &format!("docker {args:?}"))
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        super::stop_child(&mut self.child);
        let _ = Command::new("umount").arg("-R").arg(self.dir.join("exec")).stderr(Stdio::null()).status();
        if std::thread::panicking() {
            eprintln!("{}", std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default());
        }
    }
}
