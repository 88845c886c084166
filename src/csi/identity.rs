//! CSI Identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Error, Shared, blocking, outcome};
use crate::DRIVER_NAME;
use crate::proto::csi::v1::identity_server::Identity;
use crate::proto::csi::v1::plugin_capability::{
    Service, Type, VolumeExpansion, service, volume_expansion,
};
use crate::proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// Identity: name, version, capabilities, readiness.
#[derive(Debug, Clone)]
pub struct IdentityService {
    shared: Arc<Shared>,
}

impl IdentityService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let service = |t: service::Type| PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(service::Type::ControllerService),
                service(service::Type::VolumeAccessibilityConstraints),
                PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    })),
                },
            ],
        }))
    }

    /// Ready only when every pool is a writable directory whose filesystem
    /// answers; otherwise FAILED_PRECONDITION naming the pool. A `dir`
    /// pool whose filesystem cannot limit a directory is ready too: its
    /// volumes are accounted, not enforced, which the agent logs at start
    /// and each volume's context (`enforced`) tells.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let shared = self.shared.clone();
        let res = blocking(move || shared.store.probe().map_err(Error::from)).await;
        outcome("Probe", "", res, true).map(|_| Response::new(ProbeResponse { ready: Some(true) }))
    }
}
