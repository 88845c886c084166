//! What a StorageClass served by Stead may say, checked before anything is
//! created: a class with a parameter Stead does not know provisions nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::storage::v1::StorageClass;

use crate::storage::Allocation;
use crate::{DRIVER_NAME, TOPOLOGY_KEY};

/// The parameter that selects the pool on the node.
pub const PARAM_POOL: &str = "pool";
/// The parameter that selects the filesystem (Filesystem volume mode only).
pub const PARAM_FSTYPE: &str = "csi.storage.k8s.io/fstype";
/// The parameter that chooses thick (the default) or thin image volumes.
pub const PARAM_ALLOCATION: &str = "allocation";
/// The parameter that says what happens to a volume when its node is lost:
/// `keep` (the default) or `release` (see `nodeloss`).
pub const PARAM_ON_NODE_LOSS: &str = "onNodeLoss";
/// How long a node may be NotReady and unreachable before its `release`
/// volumes are released (a deleted Node is lost at once).
pub const PARAM_NODE_LOSS_TIMEOUT: &str = "nodeLossTimeout";
/// The default of [`PARAM_NODE_LOSS_TIMEOUT`]: the 300 s that Kubernetes'
/// DefaultTolerationSeconds gives every pod for `node.kubernetes.io/unreachable`,
/// after which the taint manager evicts the pod anyway.
pub const DEFAULT_NODE_LOSS_TIMEOUT: Duration = Duration::from_secs(300);
/// The shortest [`PARAM_NODE_LOSS_TIMEOUT`]: a node is tainted unreachable
/// after 40 s without a heartbeat (kube-controller-manager's default
/// node-monitor-grace-period); a minute more keeps a network blip or a
/// kubelet restart from giving up a node's data.
pub const MIN_NODE_LOSS_TIMEOUT: Duration = Duration::from_secs(60);
/// The parameter that says what a restore or clone does when the scheduler
/// puts its pod on another node than the one that holds the data: `pull`
/// (the default) or `refuse` (see [`CrossNode`]).
pub const PARAM_CROSS_NODE_RESTORE: &str = "crossNodeRestore";
/// Filesystems the image backend can make.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    #[error(
        "StorageClass {class}: unknown parameter {key:?} (Stead accepts only \"pool\", \"allocation\", \"onNodeLoss\", \"nodeLossTimeout\", \"crossNodeRestore\" and \"csi.storage.k8s.io/fstype\")"
    )]
    UnknownParameter { class: String, key: String },
    #[error(
        "StorageClass {class}: parameter allocation {value:?} is not supported (thick, the default, or thin)"
    )]
    Allocation { class: String, value: String },
    #[error(
        "StorageClass {class}: parameter onNodeLoss {value:?} is not supported (keep, the default, or release)"
    )]
    OnNodeLoss { class: String, value: String },
    #[error(
        "StorageClass {class}: parameter crossNodeRestore {value:?} is not supported (pull, the default, or refuse)"
    )]
    CrossNodeRestore { class: String, value: String },
    #[error("StorageClass {class}: parameter nodeLossTimeout {value:?} {reason}")]
    NodeLossTimeout {
        class: String,
        value: String,
        reason: String,
    },
    #[error(
        "StorageClass {class}: parameter nodeLossTimeout applies only with onNodeLoss: release (a kept volume waits for its node however long)"
    )]
    TimeoutWithoutRelease { class: String },
    #[error(
        "StorageClass {class}: onNodeLoss: release gives up the data of a lost node, which reclaimPolicy Retain promises to keep; use reclaimPolicy Delete, or onNodeLoss: keep"
    )]
    ReleaseRetained { class: String },
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

/// What happens to a class's volumes when their node is lost (its Node
/// deleted, or NotReady and tainted unreachable for longer than `timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeLoss {
    /// Nothing is deleted: the pod waits for its node (the default).
    #[default]
    Keep,
    /// The claim is released so that its pod starts elsewhere with a new
    /// empty volume; the lost node's data is given up.
    Release { timeout: Duration },
}

impl NodeLoss {
    pub fn is_release(&self) -> bool {
        matches!(self, NodeLoss::Release { .. })
    }
}

/// What a claim filled from a source (a snapshot, a claim to clone) does
/// when the scheduler puts its pod on a node other than the one holding the
/// data.
///
/// `Pull` is the default because it is safe: the data is copied, never
/// moved (the source stays whole on its node); it travels only between
/// agents that present a certificate of the cluster's transfer CA (mutual
/// TLS), is checked chunk by chunk and by a digest of the whole content
/// before the volume gets its PV, and a transfer that cannot finish leaves
/// no volume behind. An agent without the trust material (no Secret
/// `stead-transfer-tls`) does what `Refuse` does, and says how to enable
/// the pull. `Refuse` is for data that must not leave its node (or a
/// network that must not carry it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrossNode {
    /// The chosen node's agent pulls the data from the holder's agent.
    #[default]
    Pull,
    /// The claim's node choice is moved to the holder: its pod runs there,
    /// or stays Pending when it cannot.
    Refuse,
}

impl CrossNode {
    pub fn as_str(&self) -> &'static str {
        match self {
            CrossNode::Pull => "pull",
            CrossNode::Refuse => "refuse",
        }
    }
}

/// Parses a duration as Kubernetes writes them (`90s`, `5m`, `1h30m`):
/// one or more whole numbers, each followed by `h`, `m` or `s`. Hand-written
/// because that grammar is these few lines; a crate (humantime) would accept
/// other spellings (`5 minutes`) that the README would then have to promise.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    if text.is_empty() {
        return None;
    }
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        let n: u64 = digits.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        digits.clear();
    }
    digits.is_empty().then_some(Duration::from_secs(total))
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
    /// `onNodeLoss` and `nodeLossTimeout`.
    pub node_loss: NodeLoss,
    /// `crossNodeRestore`.
    pub cross_node: CrossNode,
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
    let mut release = false;
    let mut timeout = None;
    let mut cross_node = CrossNode::default();
    for (key, value) in sc.parameters.iter().flatten() {
        match key.as_str() {
            PARAM_CROSS_NODE_RESTORE => {
                cross_node = match value.as_str() {
                    "pull" => CrossNode::Pull,
                    "refuse" => CrossNode::Refuse,
                    _ => {
                        return Err(ClassError::CrossNodeRestore {
                            class,
                            value: value.clone(),
                        });
                    }
                };
            }
            PARAM_ON_NODE_LOSS => {
                release = match value.as_str() {
                    "keep" => false,
                    "release" => true,
                    _ => {
                        return Err(ClassError::OnNodeLoss {
                            class,
                            value: value.clone(),
                        });
                    }
                };
            }
            PARAM_NODE_LOSS_TIMEOUT => {
                let bad = |reason: String| ClassError::NodeLossTimeout {
                    class: class.clone(),
                    value: value.clone(),
                    reason,
                };
                let Some(d) = parse_duration(value) else {
                    return Err(bad(
                        "is not a duration (whole numbers with h, m or s: 90s, 5m, 1h30m)".into(),
                    ));
                };
                if d < MIN_NODE_LOSS_TIMEOUT {
                    return Err(bad(format!(
                        "is shorter than the minimum {} s (a node is tainted unreachable after 40 s without a heartbeat; a shorter wait would give up the data of a node that only blinked)",
                        MIN_NODE_LOSS_TIMEOUT.as_secs()
                    )));
                }
                timeout = Some(d);
            }
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
    let node_loss = match (release, timeout) {
        (true, t) if reclaim_delete => NodeLoss::Release {
            timeout: t.unwrap_or(DEFAULT_NODE_LOSS_TIMEOUT),
        },
        (true, _) => return Err(ClassError::ReleaseRetained { class }),
        (false, Some(_)) => return Err(ClassError::TimeoutWithoutRelease { class }),
        (false, None) => NodeLoss::Keep,
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
        node_loss,
        cross_node,
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

    #[test]
    fn node_loss_defaults_to_keep_and_release_takes_a_timeout() {
        let plain = parse(&class("plain", &[], "WaitForFirstConsumer", "Delete")).unwrap();
        assert_eq!(plain.node_loss, NodeLoss::Keep);
        let released = parse(&class(
            "db",
            &[("onNodeLoss", "release")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap();
        assert_eq!(
            released.node_loss,
            NodeLoss::Release {
                timeout: DEFAULT_NODE_LOSS_TIMEOUT
            }
        );
        let timed = parse(&class(
            "db",
            &[("onNodeLoss", "release"), ("nodeLossTimeout", "1h30m")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap();
        assert_eq!(
            timed.node_loss,
            NodeLoss::Release {
                timeout: Duration::from_secs(5400)
            }
        );
        assert!(
            !timed.csi_parameters().contains_key("onNodeLoss"),
            "the provisioner's business, not CreateVolume's"
        );
        let kept = parse(&class(
            "db",
            &[("onNodeLoss", "keep")],
            "WaitForFirstConsumer",
            "Retain",
        ))
        .unwrap();
        assert_eq!(kept.node_loss, NodeLoss::Keep);
    }

    #[test]
    fn bad_node_loss_parameters_are_refused_naming_class_and_parameter() {
        /// The parameters, the reclaim policy, the error's start.
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: [Case; 6] = [
            (
                &[("onNodeLoss", "Release")],
                "Delete",
                "StorageClass db: parameter onNodeLoss \"Release\" is not supported (keep, the default, or release)",
            ),
            (
                &[("onNodeLoss", "release"), ("nodeLossTimeout", "5 minutes")],
                "Delete",
                "StorageClass db: parameter nodeLossTimeout \"5 minutes\" is not a duration",
            ),
            (
                &[("onNodeLoss", "release"), ("nodeLossTimeout", "30s")],
                "Delete",
                "StorageClass db: parameter nodeLossTimeout \"30s\" is shorter than the minimum 60 s",
            ),
            (
                &[("onNodeLoss", "release"), ("nodeLossTimeout", "")],
                "Delete",
                "StorageClass db: parameter nodeLossTimeout \"\" is not a duration",
            ),
            (
                &[("nodeLossTimeout", "10m")],
                "Delete",
                "StorageClass db: parameter nodeLossTimeout applies only with onNodeLoss: release",
            ),
            (
                &[("onNodeLoss", "release")],
                "Retain",
                "StorageClass db: onNodeLoss: release gives up the data of a lost node, which reclaimPolicy Retain promises to keep",
            ),
        ];
        for (params, reclaim, want) in cases {
            let err = parse(&class("db", params, "WaitForFirstConsumer", reclaim)).unwrap_err();
            assert!(err.to_string().starts_with(want), "{err} / {want}");
        }
    }

    #[test]
    fn cross_node_restore_defaults_to_pull_and_is_refused_by_name_when_unknown() {
        let plain = parse(&class("plain", &[], "WaitForFirstConsumer", "Delete")).unwrap();
        assert_eq!(plain.cross_node, CrossNode::Pull);
        let kept = parse(&class(
            "local",
            &[("crossNodeRestore", "refuse")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap();
        assert_eq!(kept.cross_node, CrossNode::Refuse);
        assert!(
            !kept.csi_parameters().contains_key("crossNodeRestore"),
            "the provisioner's business, not CreateVolume's"
        );
        let explicit = parse(&class(
            "moving",
            &[("crossNodeRestore", "pull")],
            "Immediate",
            "Retain",
        ))
        .unwrap();
        assert_eq!(explicit.cross_node, CrossNode::Pull);
        let err = parse(&class(
            "odd",
            &[("crossNodeRestore", "Pull")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "StorageClass odd: parameter crossNodeRestore \"Pull\" is not supported (pull, the default, or refuse)"
        );
        let err = parse(&class(
            "odd",
            &[("crossNode", "pull")],
            "Immediate",
            "Delete",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("\"crossNodeRestore\""), "{err}");
    }

    #[test]
    fn durations_are_whole_numbers_with_units() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        for bad in ["", "5", "m", "1.5m", "-5m", "5d", "99999999999999999999h"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
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
