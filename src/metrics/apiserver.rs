//! Requests to the Kubernetes apiserver, counted by a tower layer on the
//! kube client's stack (`kube::client::ClientBuilder::with_layer`): every
//! request of every part of the provisioner, Events included, by verb,
//! resource and HTTP status.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;

use super::Metrics;
use super::layer::{ObserveLayer, Observer};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct Labels {
    verb: &'static str,
    resource: String,
    code: String,
}

impl Labels {
    #[cfg(test)]
    pub(super) fn new(verb: &'static str, resource: &str, code: &str) -> Labels {
        Labels {
            verb,
            resource: resource.to_string(),
            code: code.to_string(),
        }
    }
}

/// The verb and resource of a request, as the apiserver's own metrics name
/// them (`list`, `watch`, `get`, `create`, `update`, `patch`, `delete`,
/// `deletecollection`; `persistentvolumeclaims/status`). The resource comes
/// from a path the agent's code built, so it is one of the few kinds the
/// agent uses; a path of no resource (`/version`) is `none`.
fn classify(method: &http::Method, uri: &http::Uri) -> (&'static str, String) {
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[][..],
    };
    // namespaces/<ns>/<resource>… is a namespaced resource; namespaces
    // alone (or namespaces/<name>) is the namespace kind itself.
    let rest = match rest {
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named) = match rest {
        [] => ("none".to_string(), false),
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub, ..] => (format!("{resource}/{sub}"), true),
    };
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if named => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "other",
    };
    (verb, resource)
}

/// Counts every request of the client it wraps; a request that got no
/// response (a connection refused, a timeout) is counted with code `error`.
pub type ApiserverLayer = ObserveLayer<Apiserver>;

pub fn layer(metrics: Arc<Metrics>) -> ApiserverLayer {
    ObserveLayer(Apiserver(metrics))
}

#[derive(Clone)]
pub struct Apiserver(Arc<Metrics>);

impl Observer for Apiserver {
    type Started = (&'static str, String);

    fn start(&self, method: &http::Method, uri: &http::Uri) -> Self::Started {
        classify(method, uri)
    }

    fn end(
        &self,
        (verb, resource): Self::Started,
        response: Option<(http::StatusCode, &http::HeaderMap)>,
    ) {
        let code = response.map_or_else(|| "error".to_string(), |(s, _)| s.as_str().to_string());
        let labels = Labels {
            verb,
            resource,
            code,
        };
        self.0.apiserver.get_or_create(&labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn of(method: Method, uri: &str) -> (&'static str, String) {
        classify(&method, &uri.parse().unwrap())
    }

    #[test]
    fn requests_are_named_by_verb_and_resource() {
        let cases = [
            (
                Method::GET,
                "/api/v1/persistentvolumeclaims?&watch=true&resourceVersion=1",
                "watch",
                "persistentvolumeclaims",
            ),
            (
                Method::GET,
                "/api/v1/persistentvolumes?labelSelector=a%3Db",
                "list",
                "persistentvolumes",
            ),
            (
                Method::GET,
                "/api/v1/persistentvolumes/pvc-1",
                "get",
                "persistentvolumes",
            ),
            (
                Method::PATCH,
                "/api/v1/namespaces/db/persistentvolumeclaims/data-0",
                "patch",
                "persistentvolumeclaims",
            ),
            (
                Method::PATCH,
                "/api/v1/namespaces/db/persistentvolumeclaims/data-0/status",
                "patch",
                "persistentvolumeclaims/status",
            ),
            (
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/db/events",
                "create",
                "events",
            ),
            (
                Method::PUT,
                "/apis/storage.k8s.io/v1/namespaces/stead-system/csistoragecapacities/c",
                "update",
                "csistoragecapacities",
            ),
            (
                Method::DELETE,
                "/api/v1/persistentvolumes/pvc-1",
                "delete",
                "persistentvolumes",
            ),
            (
                Method::DELETE,
                "/api/v1/persistentvolumes",
                "deletecollection",
                "persistentvolumes",
            ),
            (Method::GET, "/api/v1/namespaces/db", "get", "namespaces"),
            (Method::GET, "/version", "list", "none"),
        ];
        for (method, uri, verb, resource) in cases {
            assert_eq!(of(method, uri), (verb, resource.to_string()), "{uri}");
        }
    }

    #[tokio::test]
    async fn responses_count_by_status_and_failures_as_error() {
        use tower::{Layer, ServiceExt};
        let metrics = Arc::new(Metrics::new(Vec::new));
        let svc =
            layer(metrics.clone()).layer(tower::service_fn(|req: http::Request<()>| async move {
                match req.uri().path() {
                    "/api/v1/nodes/gone" => {
                        Ok(http::Response::builder().status(404).body(()).unwrap())
                    }
                    "/api/v1/nodes/n1" => Ok(http::Response::new(())),
                    _ => Err("connection refused"),
                }
            }));
        for path in [
            "/api/v1/nodes/n1",
            "/api/v1/nodes/n1",
            "/api/v1/nodes/gone",
            "/api/v1/nodes",
        ] {
            let req = http::Request::builder().uri(path).body(()).unwrap();
            let _ = svc.clone().oneshot(req).await;
        }
        let text = metrics.encode().unwrap();
        for line in [
            r#"stead_apiserver_requests_total{verb="get",resource="nodes",code="200"} 2"#,
            r#"stead_apiserver_requests_total{verb="get",resource="nodes",code="404"} 1"#,
            r#"stead_apiserver_requests_total{verb="list",resource="nodes",code="error"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
