//! The CSI RPC histogram's two feeds, so that no RPC goes uncounted: a
//! tower layer on the socket's gRPC server (every service and method,
//! kubelet's and the sidecars' calls, unknown paths too), and a wrapper of
//! the controller the provisioner calls in-process.

use std::fmt::Write;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use tonic::{Code, Request, Response, Status};

use super::Metrics;
use super::layer::{ObserveLayer, Observer};
use crate::proto::csi::v1::controller_server::Controller;
use crate::proto::csi::v1::*;

/// A gRPC code as grpc-go names it (`OK`, `Canceled`, `NotFound`…), the
/// names dashboards of gRPC servers expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GrpcCode(Code);

impl EncodeLabelValue for GrpcCode {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        match self.0 {
            Code::Ok => encoder.write_str("OK"),
            Code::Cancelled => encoder.write_str("Canceled"),
            // The other variants are named as grpc-go names them.
            code => write!(encoder, "{code:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct Labels {
    method: &'static str,
    code: GrpcCode,
}

impl Labels {
    pub(super) fn new(method: &'static str, code: Code) -> Labels {
        Labels {
            method,
            code: GrpcCode(code),
        }
    }
}

/// The CSI method of a request path (`/csi.v1.Node/NodeGetInfo` →
/// `NodeGetInfo`); `unknown` for a path that names none, so that a client
/// cannot make up series.
fn method_of(path: &str) -> &'static str {
    let name = path
        .strip_prefix("/csi.v1.")
        .and_then(|p| p.split_once('/'))
        .map(|(_, m)| m);
    METHODS
        .iter()
        .find(|m| Some(**m) == name)
        .copied()
        .unwrap_or("unknown")
}

/// The code of a gRPC response: tonic puts an error's `grpc-status` in the
/// headers (a trailers-only response); a unary response without one is a
/// success, whose status comes in the trailers.
fn code_of(headers: &http::HeaderMap) -> Code {
    headers
        .get("grpc-status")
        .map_or(Code::Ok, |v| Code::from_bytes(v.as_bytes()))
}

/// Times every request of the server it wraps (`Server::builder().layer`).
pub type RpcLayer = ObserveLayer<Rpc>;

pub fn layer(metrics: Arc<Metrics>) -> RpcLayer {
    ObserveLayer(Rpc(metrics))
}

#[derive(Clone)]
pub struct Rpc(Arc<Metrics>);

impl Observer for Rpc {
    type Started = (&'static str, Instant);

    fn start(&self, _: &http::Method, uri: &http::Uri) -> Self::Started {
        (method_of(uri.path()), Instant::now())
    }

    fn end(
        &self,
        (method, start): Self::Started,
        response: Option<(http::StatusCode, &http::HeaderMap)>,
    ) {
        // A unary RPC's handler has returned once its response is.
        let code = response.map_or(Code::Unknown, |(_, headers)| code_of(headers));
        self.0.observe_rpc(method, code, start.elapsed());
    }
}

/// The controller the provisioner calls in-process, timed like the
/// socket's RPCs: the compiler holds it to every method of the service.
pub struct ObservedController<C> {
    inner: C,
    metrics: Arc<Metrics>,
}

impl<C> ObservedController<C> {
    pub fn new(inner: C, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn observe<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let start = Instant::now();
        let res = call.await;
        let code = res.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.observe_rpc(method, code, start.elapsed());
        res
    }
}

macro_rules! observed {
    ($($method:ident: $req:ident -> $resp:ident = $name:literal;)*) => {
        #[tonic::async_trait]
        impl<C: Controller> Controller for ObservedController<C> {
            $(async fn $method(&self, r: Request<$req>) -> Result<Response<$resp>, Status> {
                self.observe($name, self.inner.$method(r)).await
            })*
        }

        #[cfg(test)]
        const OBSERVED: &[&str] = &[$($name),*];
    };
}

observed! {
    create_volume: CreateVolumeRequest -> CreateVolumeResponse = "CreateVolume";
    delete_volume: DeleteVolumeRequest -> DeleteVolumeResponse = "DeleteVolume";
    controller_publish_volume: ControllerPublishVolumeRequest -> ControllerPublishVolumeResponse = "ControllerPublishVolume";
    controller_unpublish_volume: ControllerUnpublishVolumeRequest -> ControllerUnpublishVolumeResponse = "ControllerUnpublishVolume";
    validate_volume_capabilities: ValidateVolumeCapabilitiesRequest -> ValidateVolumeCapabilitiesResponse = "ValidateVolumeCapabilities";
    list_volumes: ListVolumesRequest -> ListVolumesResponse = "ListVolumes";
    get_capacity: GetCapacityRequest -> GetCapacityResponse = "GetCapacity";
    controller_get_capabilities: ControllerGetCapabilitiesRequest -> ControllerGetCapabilitiesResponse = "ControllerGetCapabilities";
    create_snapshot: CreateSnapshotRequest -> CreateSnapshotResponse = "CreateSnapshot";
    delete_snapshot: DeleteSnapshotRequest -> DeleteSnapshotResponse = "DeleteSnapshot";
    list_snapshots: ListSnapshotsRequest -> ListSnapshotsResponse = "ListSnapshots";
    get_snapshot: GetSnapshotRequest -> GetSnapshotResponse = "GetSnapshot";
    controller_expand_volume: ControllerExpandVolumeRequest -> ControllerExpandVolumeResponse = "ControllerExpandVolume";
    controller_get_volume: ControllerGetVolumeRequest -> ControllerGetVolumeResponse = "ControllerGetVolume";
    controller_modify_volume: ControllerModifyVolumeRequest -> ControllerModifyVolumeResponse = "ControllerModifyVolume";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_a_csi_method_or_unknown() {
        assert_eq!(method_of("/csi.v1.Controller/CreateVolume"), "CreateVolume");
        assert_eq!(
            method_of("/csi.v1.Node/NodeGetCapabilities"),
            "NodeGetCapabilities"
        );
        assert_eq!(method_of("/csi.v1.Identity/Probe"), "Probe");
        for made_up in [
            "/csi.v1.Controller/DropTables",
            "/x.y/CreateVolume",
            "/",
            "",
        ] {
            assert_eq!(method_of(made_up), "unknown", "{made_up}");
        }
        // The in-process names are csi.proto's too.
        for name in OBSERVED {
            assert!(METHODS.contains(name), "{name}");
        }
        assert_eq!(METHODS.len(), 26, "Identity 3, Controller 15, Node 8");
    }

    #[test]
    fn an_error_is_in_the_headers_and_a_success_is_not() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(code_of(&headers), Code::Ok);
        headers.insert("grpc-status", "3".parse().unwrap());
        assert_eq!(code_of(&headers), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn the_layer_times_each_request_by_method_and_code() {
        use tower::{Layer, ServiceExt};
        let metrics = Arc::new(Metrics::new(Vec::new));
        let svc =
            layer(metrics.clone()).layer(tower::service_fn(|req: http::Request<()>| async move {
                let mut resp = http::Response::new(());
                if req.uri().path().ends_with("DeleteVolume") {
                    resp.headers_mut()
                        .insert("grpc-status", "5".parse().unwrap());
                }
                Ok::<_, std::convert::Infallible>(resp)
            }));
        for path in [
            "/csi.v1.Controller/CreateVolume",
            "/csi.v1.Controller/DeleteVolume",
            "/csi.v1.Controller/DeleteVolume",
        ] {
            let req = http::Request::builder().uri(path).body(()).unwrap();
            svc.clone().oneshot(req).await.unwrap();
        }
        let text = metrics.encode().unwrap();
        for line in [
            r#"stead_csi_rpc_duration_seconds_count{method="CreateVolume",code="OK"} 1"#,
            r#"stead_csi_rpc_duration_seconds_count{method="DeleteVolume",code="NotFound"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
