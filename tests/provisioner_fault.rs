//! A broken provisioner never takes the node plugin down: with a state
//! directory it cannot create and an apiserver nobody answers on, the agent
//! keeps serving CSI (and liveness), reports the provisioner on /readyz, and
//! restarts the provisioner with backoff.

mod common;

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use stead::proto::csi::v1::controller_client::ControllerClient;
use stead::proto::csi::v1::identity_client::IdentityClient;
use stead::proto::csi::v1::*;
use tonic::transport::Endpoint;

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A kubeconfig whose only cluster is `server`.
fn kubeconfig(dir: &Path, server: SocketAddr) -> PathBuf {
    let path = dir.join("kubeconfig");
    fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster:
    server: http://{server}
users:
- name: nobody
  user:
    token: not-a-token
contexts:
- name: nowhere
  context:
    cluster: nowhere
    user: nobody
current-context: nowhere
"
        ),
    )
    .unwrap();
    path
}

/// The agent's process, killed (and its root removed) when dropped.
struct Broken {
    child: Child,
    root: PathBuf,
}

impl Broken {
    fn log(&self) -> String {
        fs::read_to_string(self.root.join("stead.log")).unwrap_or_default()
    }

    /// Waits until the agent's log holds `n` lines containing `needle`;
    /// fails at once should the agent exit meanwhile.
    async fn wait_log(&mut self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log().matches(needle).count() < n {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the agent exited ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no {n} log lines with {needle:?}; log:\n{}",
                self.log()
            );
            // A log file has no watch: the lines are the condition, the
            // interval only bounds the cost of looking.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Broken {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- stead log ----\n{}", self.log());
        }
        release_under(&self.root);
        let _ = fs::remove_dir_all(&self.root);
    }
}

#[tokio::test]
async fn csi_keeps_serving_while_the_provisioner_fails_and_restarts() {
    let root = std::env::temp_dir().join(format!("stead-it-provfault-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    // The state directory lies under a regular file: the provisioner's
    // intent ledger cannot be opened.
    fs::write(root.join("not-a-dir"), b"").unwrap();
    let state_dir = root.join("not-a-dir/state");
    let socket = root.join("csi.sock");
    let health = closed_port();
    let log = fs::File::create(root.join("stead.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_stead"))
        .arg("node")
        .arg("--provisioner=true")
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--health-addr")
        .arg(health.to_string())
        .env("STEAD_CSI_ENDPOINT", format!("unix://{}", socket.display()))
        .env("NODE_NAME", NODE)
        .env(
            "STEAD_POOLS",
            // No reserve: the pool lies on the machine's disk (see common).
            format!("dir:dir:{}:reserve=0", root.join("pools/dir").display()),
        )
        .env("KUBECONFIG", kubeconfig(&root, closed_port()))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start stead");
    let mut agent = Broken { child, root };

    // The provisioner fails, and is started again after its backoff.
    agent.wait_log("provisioner failed", 2).await;
    assert!(
        agent.log().contains("provisioner state"),
        "the failure names the ledger"
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent is still running:\n{}",
        agent.log()
    );

    // CSI answers as if nothing happened.
    let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))
        .unwrap()
        .connect()
        .await
        .expect("CSI socket answers");
    let probe = IdentityClient::new(channel.clone())
        .probe(ProbeRequest {})
        .await
        .expect("Probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let mut controller = ControllerClient::new(channel);
    let vol = controller
        .create_volume(create_req("pvc-fault", "dir", mount_cap(""), 16 * MIB))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "pvc-fault");
    controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-fault".into(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");

    // Liveness holds; readiness tells why the provisioner is not working.
    let r = http_get(health, "/healthz").await;
    assert!(r.status.contains("200"), "{}: {}", r.status, r.body);
    let r = http_get(health, "/readyz").await;
    assert!(
        r.status.contains("503") && r.body.contains("provisioner"),
        "{}: {}",
        r.status,
        r.body
    );

    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent is still running:\n{}",
        agent.log()
    );
}
