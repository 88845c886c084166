//! What a StorageClass served by Stead may say, checked before anything is
//! created: a class with a parameter Stead does not know provisions nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::storage::v1::StorageClass;

use crate::storage::Allocation;
use crate::{DRIVER_NAME, TOPOLOGY_KEY};

/// The parameter that selects the pool on the node.
pub const PARAM_POOL: &str = "pool";
/// The parameter that selects the filesystem (Filesystem volume mode only).
pub const PARAM_FSTYPE: &str = "csi.storage.k8s.io/fstype";
/// The parameter that chooses thick (the default) or thin image volumes.
pub const PARAM_ALLOCATION: &str = "allocation";
/// Filesystems the image backend can make.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    #[error(
        "StorageClass {class}: unknown parameter {key:?} (Stead accepts only \"pool\", \"allocation\" and \"csi.storage.k8s.io/fstype\")"
    )]
    UnknownParameter { class: String, key: String },
    #[error(
        "StorageClass {class}: parameter allocation {value:?} is not supported (thick, the default, or thin)"
    )]
    Allocation { class: String, value: String },
    #[error("StorageClass {class}: parameter {key:?} is empty")]
    EmptyParameter { class: String, key: &'static str },
    #[error(
        "StorageClass {class}: parameter csi.storage.k8s.io/fstype {fs_type:?} is not supported (ext4 or xfs)"
    )]
    FsType { class: String, fs_type: String },
    #[error("StorageClass {class}: reclaimPolicy {policy:?} is not supported (Delete or Retain)")]
    ReclaimPolicy { class: String, policy: String },
    #[error("StorageClass {class}: {field} {reason}")]
    AllowedTopologies {
        class: String,
        /// The path of the bad part, e.g.
        /// `allowedTopologies[0].matchLabelExpressions[1].values`.
        field: String,
        reason: &'static str,
    },
}

/// One term of a class's `allowedTopologies`: a node satisfies it when, for
/// every key, the node's label of that key has one of the values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyTerm {
    pub requirements: BTreeMap<String, BTreeSet<String>>,
}

impl TopologyTerm {
    /// Whether the node `node` with `labels` satisfies every requirement.
    /// Stead's own key means the node's name (that is what Stead puts
    /// there, see `claim::node_topology`), so a node whose label kubelet
    /// has not written yet is still matched by its name.
    pub fn matches(&self, node: &str, labels: Option<&BTreeMap<String, String>>) -> bool {
        self.requirements.iter().all(|(key, values)| {
            let value = labels
                .and_then(|l| l.get(key))
                .map(String::as_str)
                .or_else(|| (key == TOPOLOGY_KEY).then_some(node));
            value.is_some_and(|v| values.contains(v))
        })
    }
}

impl fmt::Display for TopologyTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|(k, vs)| {
                let vs: Vec<&str> = vs.iter().map(String::as_str).collect();
                format!("{k} in ({})", vs.join(", "))
            })
            .collect();
        write!(f, "{{{}}}", parts.join(", "))
    }
}

/// A Stead StorageClass, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSpec {
    pub name: String,
    /// `None`: the node's default (first) pool.
    pub pool: Option<String>,
    /// `None`: the driver's default (ext4).
    pub fs_type: Option<String>,
    /// `None`: the backend's default (thick images).
    pub allocation: Option<Allocation>,
    pub wait_for_first_consumer: bool,
    pub reclaim_delete: bool,
    pub mount_options: Vec<String>,
    /// The class's `allowedTopologies`; empty: every node.
    pub allowed_topologies: Vec<TopologyTerm>,
}

impl ClassSpec {
    /// The CreateVolume/GetCapacity parameters for this class.
    pub fn csi_parameters(&self) -> BTreeMap<String, String> {
        self.pool
            .iter()
            .map(|p| (PARAM_POOL.to_string(), p.clone()))
            .chain(
                self.allocation
                    .map(|a| (PARAM_ALLOCATION.to_string(), a.as_str().to_string())),
            )
            .collect()
    }

    /// Whether the class lets its volumes live on `node` (with `labels`):
    /// at least one term of `allowedTopologies` is satisfied, or there are
    /// none.
    pub fn allows_node(&self, node: &str, labels: Option<&BTreeMap<String, String>>) -> bool {
        self.allowed_topologies.is_empty()
            || self
                .allowed_topologies
                .iter()
                .any(|t| t.matches(node, labels))
    }

    /// The class's `allowedTopologies`, for messages.
    pub fn allowed_topologies_text(&self) -> String {
        let terms: Vec<String> = self
            .allowed_topologies
            .iter()
            .map(ToString::to_string)
            .collect();
        format!("[{}]", terms.join(", "))
    }

    pub fn reclaim_policy(&self) -> &'static str {
        if self.reclaim_delete {
            "Delete"
        } else {
            "Retain"
        }
    }
}

/// True when the class names Stead as its provisioner.
pub fn is_stead(sc: &StorageClass) -> bool {
    sc.provisioner == DRIVER_NAME
}

/// Validates a Stead StorageClass.
pub fn parse(sc: &StorageClass) -> Result<ClassSpec, ClassError> {
    let class = sc.metadata.name.clone().unwrap_or_default();
    let mut pool = None;
    let mut fs_type = None;
    let mut allocation = None;
    for (key, value) in sc.parameters.iter().flatten() {
        match key.as_str() {
            PARAM_ALLOCATION => {
                allocation =
                    Some(
                        Allocation::parse(value).ok_or_else(|| ClassError::Allocation {
                            class: class.clone(),
                            value: value.clone(),
                        })?,
                    );
            }
            PARAM_POOL => {
                if value.is_empty() {
                    return Err(ClassError::EmptyParameter {
                        class,
                        key: PARAM_POOL,
                    });
                }
                pool = Some(value.clone());
            }
            PARAM_FSTYPE => {
                if !FS_TYPES.contains(&value.as_str()) {
                    return Err(ClassError::FsType {
                        class,
                        fs_type: value.clone(),
                    });
                }
                fs_type = Some(value.clone());
            }
            _ => {
                return Err(ClassError::UnknownParameter {
                    class,
                    key: key.clone(),
                });
            }
        }
    }
    let reclaim_delete = match sc.reclaim_policy.as_deref() {
        None | Some("Delete") => true,
        Some("Retain") => false,
        Some(other) => {
            return Err(ClassError::ReclaimPolicy {
                class,
                policy: other.to_string(),
            });
        }
    };
    let allowed_topologies = allowed_topologies(sc, &class)?;
    Ok(ClassSpec {
        name: class,
        pool,
        fs_type,
        allocation,
        wait_for_first_consumer: sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"),
        reclaim_delete,
        mount_options: sc.mount_options.clone().unwrap_or_default(),
        allowed_topologies,
    })
}

/// Parses `allowedTopologies` the way the apiserver validates it (a term
/// has at least one expression, a key is not empty nor repeated in its
/// term, values are not empty), so that a class that slipped past
/// validation is refused by name instead of matching nothing or everything.
fn allowed_topologies(sc: &StorageClass, class: &str) -> Result<Vec<TopologyTerm>, ClassError> {
    let bad = |field: String, reason: &'static str| ClassError::AllowedTopologies {
        class: class.to_string(),
        field,
        reason,
    };
    let mut terms = Vec::new();
    for (i, term) in sc.allowed_topologies.iter().flatten().enumerate() {
        let exprs = term.match_label_expressions.as_deref().unwrap_or_default();
        if exprs.is_empty() {
            return Err(bad(
                format!("allowedTopologies[{i}].matchLabelExpressions"),
                "is empty (a term needs at least one expression)",
            ));
        }
        let mut requirements = BTreeMap::new();
        for (j, expr) in exprs.iter().enumerate() {
            let at = format!("allowedTopologies[{i}].matchLabelExpressions[{j}]");
            if expr.key.is_empty() {
                return Err(bad(format!("{at}.key"), "is empty"));
            }
            if expr.values.is_empty() {
                return Err(bad(
                    format!("{at}.values"),
                    "is empty (no node could match)",
                ));
            }
            if expr.values.iter().any(String::is_empty) {
                return Err(bad(format!("{at}.values"), "holds an empty value"));
            }
            let values: BTreeSet<String> = expr.values.iter().cloned().collect();
            if requirements.insert(expr.key.clone(), values).is_some() {
                return Err(bad(format!("{at}.key"), "repeats a key of the same term"));
            }
        }
        terms.push(TopologyTerm { requirements });
    }
    Ok(terms)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub fn class(name: &str, params: &[(&str, &str)], mode: &str, reclaim: &str) -> StorageClass {
        StorageClass {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            provisioner: DRIVER_NAME.into(),
            parameters: Some(
                params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            volume_binding_mode: Some(mode.into()),
            reclaim_policy: Some(reclaim.into()),
            ..Default::default()
        }
    }

    #[test]
    fn pool_and_fstype_are_understood() {
        let sc = class(
            "stead",
            &[("pool", "image"), ("csi.storage.k8s.io/fstype", "xfs")],
            "WaitForFirstConsumer",
            "Retain",
        );
        let spec = parse(&sc).unwrap();
        assert_eq!(spec.pool.as_deref(), Some("image"));
        assert_eq!(spec.fs_type.as_deref(), Some("xfs"));
        assert!(spec.wait_for_first_consumer);
        assert!(!spec.reclaim_delete);
        assert_eq!(
            spec.csi_parameters().get("pool").map(String::as_str),
            Some("image")
        );
    }

    #[test]
    fn unknown_parameter_is_refused_by_name() {
        let sc = class("fast", &[("speed", "ludicrous")], "Immediate", "Delete");
        let err = parse(&sc).unwrap_err();
        assert_eq!(
            err,
            ClassError::UnknownParameter {
                class: "fast".into(),
                key: "speed".into()
            }
        );
        assert!(err.to_string().contains("\"speed\""));
        assert!(err.to_string().contains("fast"));
    }

    #[test]
    fn allocation_is_passed_on_and_checked() {
        let spec = parse(&class(
            "thin",
            &[("pool", "image"), ("allocation", "thin")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap();
        assert_eq!(spec.allocation, Some(Allocation::Thin));
        let params = spec.csi_parameters();
        assert_eq!(params.get("allocation").map(String::as_str), Some("thin"));
        let err = parse(&class(
            "odd",
            &[("allocation", "Thin")],
            "Immediate",
            "Delete",
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "StorageClass odd: parameter allocation \"Thin\" is not supported (thick, the default, or thin)"
        );
        let spec = parse(&class("plain", &[], "Immediate", "Delete")).unwrap();
        assert_eq!(spec.allocation, None, "the default is the backend's");
    }

    #[test]
    fn unsupported_fstype_is_refused() {
        let sc = class(
            "s",
            &[("csi.storage.k8s.io/fstype", "zfs")],
            "Immediate",
            "Delete",
        );
        assert!(matches!(parse(&sc), Err(ClassError::FsType { .. })));
    }

    #[test]
    fn defaults_are_first_pool_immediate_delete() {
        let mut sc = class("plain", &[], "Immediate", "Delete");
        sc.reclaim_policy = None;
        sc.volume_binding_mode = None;
        let spec = parse(&sc).unwrap();
        assert_eq!(spec.pool, None);
        assert!(spec.reclaim_delete);
        assert!(!spec.wait_for_first_consumer);
        assert!(spec.csi_parameters().is_empty());
    }

    fn zoned(terms: Vec<Vec<(&str, Vec<&str>)>>) -> StorageClass {
        use k8s_openapi::api::core::v1::{TopologySelectorLabelRequirement, TopologySelectorTerm};
        let mut sc = class("zoned", &[], "WaitForFirstConsumer", "Delete");
        sc.allowed_topologies = Some(
            terms
                .into_iter()
                .map(|exprs| TopologySelectorTerm {
                    match_label_expressions: Some(
                        exprs
                            .into_iter()
                            .map(|(k, vs)| TopologySelectorLabelRequirement {
                                key: k.into(),
                                values: vs.into_iter().map(String::from).collect(),
                            })
                            .collect(),
                    ),
                })
                .collect(),
        );
        sc
    }

    #[test]
    fn allowed_topologies_are_parsed_into_terms() {
        let spec = parse(&zoned(vec![
            vec![("zone", vec!["b", "a"]), (TOPOLOGY_KEY, vec!["n1"])],
            vec![("zone", vec!["c"])],
        ]))
        .unwrap();
        assert_eq!(spec.allowed_topologies.len(), 2);
        assert_eq!(
            spec.allowed_topologies_text(),
            "[{topology.stead.csi.dev/node in (n1), zone in (a, b)}, {zone in (c)}]"
        );
        let labels = BTreeMap::from([("zone".to_string(), "c".to_string())]);
        assert!(spec.allows_node("n7", Some(&labels)));
        assert!(!spec.allows_node("n7", None));
        assert!(
            parse(&class("any", &[], "Immediate", "Delete"))
                .unwrap()
                .allows_node("n7", None),
            "no allowedTopologies: every node"
        );
    }

    #[test]
    fn malformed_allowed_topologies_are_refused_naming_class_and_field() {
        let cases = [
            (
                zoned(vec![vec![("zone", vec![])]]),
                "StorageClass zoned: allowedTopologies[0].matchLabelExpressions[0].values is empty",
            ),
            (
                zoned(vec![vec![("zone", vec!["a"])], vec![("", vec!["a"])]]),
                "StorageClass zoned: allowedTopologies[1].matchLabelExpressions[0].key is empty",
            ),
            (
                zoned(vec![vec![("zone", vec!["a", ""])]]),
                "StorageClass zoned: allowedTopologies[0].matchLabelExpressions[0].values holds an empty value",
            ),
            (
                zoned(vec![vec![("zone", vec!["a"]), ("zone", vec!["b"])]]),
                "StorageClass zoned: allowedTopologies[0].matchLabelExpressions[1].key repeats a key",
            ),
            (
                zoned(vec![vec![]]),
                "StorageClass zoned: allowedTopologies[0].matchLabelExpressions is empty",
            ),
        ];
        for (sc, want) in cases {
            let err = parse(&sc).unwrap_err();
            assert!(
                matches!(err, ClassError::AllowedTopologies { .. }),
                "{err:?}"
            );
            assert!(err.to_string().starts_with(want), "{err} / {want}");
        }
        // A term without matchLabelExpressions at all is as empty.
        let mut sc = zoned(vec![]);
        sc.allowed_topologies = Some(vec![Default::default()]);
        assert!(parse(&sc).is_err());
    }
}
