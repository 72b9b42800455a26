//! RBAC as the API server applies it, for tests that prove a service
//! account is granted exactly what a binary calls: each request this server
//! saw becomes the authorization checks the real API server makes for it
//! ([`Seen::accesses`]), and rendered manifests become the rules bound to a
//! service account ([`Grants`]). [`Grants::denied`] lists the calls the
//! rules do not allow, [`Grants::unused`] what the rules allow that no call
//! needed.
//!
//! Sources: `staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`
//! (verbs from methods; a list or watch with a `metadata.name` field
//! selector is checked against that name), `.../endpoints/handlers/patch.go`
//! and `update.go` (an apply or update that creates its object is also
//! checked as `create`, with the object's name), and
//! `pkg/apis/rbac/v1/evaluation_helpers.go` (rule matching, `*`,
//! `resourceNames`).

use std::collections::BTreeSet;
use std::fmt;

use serde_json::Value;

use crate::Seen;

/// One authorization check (`authorizer.AttributesRecord`, resource
/// requests only).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`.
    pub verb: String,
    /// The API group (`""` for the core group).
    pub group: String,
    /// The resource, with `/subresource` when there is one.
    pub resource: String,
    /// The namespace, for namespaced requests.
    pub namespace: Option<String>,
    /// The object's name, when the request names one.
    pub name: Option<String>,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)?;
        if let Some(n) = &self.name {
            write!(f, " {n:?}")?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}"),
            None => write!(f, " (cluster scope)"),
        }
    }
}

impl Seen {
    /// The authorization checks the API server makes for this request:
    /// one, or two for an apply or update that created its object (its
    /// verb and `create`). Non-resource requests give none.
    #[must_use]
    pub fn accesses(&self) -> Vec<Access> {
        let (path, query) = self
            .target
            .split_once('?')
            .unwrap_or((self.target.as_str(), ""));
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", _version, rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return Vec::new(),
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
            _ => (None, rest),
        };
        let Some((resource, rest)) = rest.split_first() else {
            return Vec::new();
        };
        let mut name = rest.first().map(|n| (*n).to_owned());
        let resource = match rest.get(1) {
            Some(sub) => format!("{resource}/{sub}"),
            None => (*resource).to_owned(),
        };
        let param = |key: &str| {
            query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == key).then(|| crate::http::unescape(v))
            })
        };
        let verb = match (self.method.as_str(), name.is_some()) {
            ("GET", true) => "get",
            ("GET", false) if param("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => return Vec::new(),
        };
        if matches!(verb, "list" | "watch") {
            // A single `metadata.name=` requirement names the object.
            name = param("fieldSelector").and_then(|s| {
                let reqs: Vec<&str> = s.split(',').collect();
                match reqs.as_slice() {
                    [one] => one
                        .strip_prefix("metadata.name=")
                        .or_else(|| one.strip_prefix("metadata.name=="))
                        .map(str::to_owned),
                    _ => None,
                }
            });
        }
        let access = Access {
            verb: verb.to_owned(),
            group: group.to_owned(),
            resource,
            namespace,
            name,
        };
        let created = matches!(verb, "patch" | "update") && self.status == 201;
        let mut out = vec![access.clone()];
        if created {
            out.push(Access {
                verb: "create".to_owned(),
                ..access
            });
        }
        out
    }
}

/// What reading the manifests failed on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RbacError {
    /// The text is not YAML.
    #[error("the manifests are not YAML")]
    Yaml(#[source] serde_yaml_ng::Error),
    /// A binding names a role that is not in the manifests.
    #[error("{binding} refers to {role}, which the manifests do not hold")]
    MissingRole {
        /// The binding.
        binding: String,
        /// The role it names.
        role: String,
    },
}

/// One rule, as bound to the service account.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bound {
    /// Where it comes from (`ClusterRole x via ClusterRoleBinding y`).
    from: String,
    /// `None`: every namespace and the cluster scope (a ClusterRoleBinding).
    namespace: Option<String>,
    groups: Vec<String>,
    resources: Vec<String>,
    names: Vec<String>,
    verbs: Vec<String>,
}

impl Bound {
    fn allows(&self, a: &Access) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        self.namespace
            .as_ref()
            .is_none_or(|ns| a.namespace.as_ref() == Some(ns))
            && any(&self.verbs, &a.verb)
            && any(&self.groups, &a.group)
            && any(&self.resources, &a.resource)
            && (self.names.is_empty() || a.name.as_ref().is_some_and(|n| self.names.contains(n)))
    }
}

/// The RBAC rules rendered manifests bind to one service account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    rules: Vec<Bound>,
    /// Namespaced resources the binary may have to reach in any namespace.
    any_namespace: Vec<String>,
}

/// The documents of a multi-document YAML text, as JSON values (empty
/// documents skipped).
///
/// # Errors
/// When the text is not YAML.
pub fn documents(yaml: &str) -> Result<Vec<Value>, RbacError> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc).map_err(RbacError::Yaml)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn text<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

impl Grants {
    /// The rules the (Cluster)RoleBindings in `manifests` (rendered YAML,
    /// every object with its namespace) bind to service account
    /// `namespace/name`.
    ///
    /// # Errors
    /// When the text is not YAML, or a binding names a role it lacks.
    pub fn of_service_account(
        manifests: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Self, RbacError> {
        let docs = documents(manifests)?;
        let find = |kind: &str, role: &str, ns: Option<&str>| {
            docs.iter().find(|d| {
                text(d, &["kind"]) == Some(kind)
                    && text(d, &["metadata", "name"]) == Some(role)
                    && (ns.is_none() || text(d, &["metadata", "namespace"]) == ns)
            })
        };
        let mut rules = Vec::new();
        for binding in &docs {
            let kind = text(binding, &["kind"]).unwrap_or("");
            let scope = match kind {
                "ClusterRoleBinding" => None,
                "RoleBinding" => Some(
                    text(binding, &["metadata", "namespace"])
                        .unwrap_or("default")
                        .to_owned(),
                ),
                _ => continue,
            };
            let ours = binding
                .get("subjects")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|s| {
                    text(s, &["kind"]) == Some("ServiceAccount")
                        && text(s, &["name"]) == Some(name)
                        && text(s, &["namespace"]) == Some(namespace)
                });
            if !ours {
                continue;
            }
            let role_kind = text(binding, &["roleRef", "kind"]).unwrap_or("");
            let role_name = text(binding, &["roleRef", "name"]).unwrap_or("");
            let binding_name = format!(
                "{kind} {}",
                text(binding, &["metadata", "name"]).unwrap_or("")
            );
            let role = match role_kind {
                "Role" => find("Role", role_name, scope.as_deref()),
                _ => find("ClusterRole", role_name, None),
            }
            .ok_or_else(|| RbacError::MissingRole {
                binding: binding_name.clone(),
                role: format!("{role_kind} {role_name}"),
            })?;
            for rule in role
                .get("rules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                rules.push(Bound {
                    from: format!("{role_kind} {role_name} via {binding_name}"),
                    namespace: scope.clone(),
                    groups: strings(&rule["apiGroups"]),
                    resources: strings(&rule["resources"]),
                    names: strings(&rule["resourceNames"]),
                    verbs: strings(&rule["verbs"]),
                });
            }
        }
        Ok(Self {
            rules,
            any_namespace: Vec::new(),
        })
    }

    /// Declares that the binary reaches `resource` in whatever namespace
    /// its work names (a DRA driver reads the claims of any pod), so a
    /// cluster-wide grant of it is not reported although a test run used
    /// only some namespaces.
    #[must_use]
    pub fn in_any_namespace(mut self, resource: &str) -> Self {
        self.any_namespace.push(resource.to_owned());
        self
    }

    /// Whether some rule allows `access`.
    #[must_use]
    pub fn allows(&self, access: &Access) -> bool {
        self.rules.iter().any(|r| r.allows(access))
    }

    /// The checks in `used` that no rule allows.
    #[must_use]
    pub fn denied(&self, used: &[Access]) -> Vec<Access> {
        let set: BTreeSet<&Access> = used.iter().filter(|a| !self.allows(a)).collect();
        set.into_iter().cloned().collect()
    }

    /// Each verb on each resource (and name) a rule grants that no check in
    /// `used` needed, described with the rule it comes from.
    #[must_use]
    pub fn unused(&self, used: &[Access]) -> Vec<String> {
        let mut out = Vec::new();
        for rule in &self.rules {
            for verb in &rule.verbs {
                for group in &rule.groups {
                    for resource in &rule.resources {
                        let names: Vec<Option<&String>> = if rule.names.is_empty() {
                            vec![None]
                        } else {
                            rule.names.iter().map(Some).collect()
                        };
                        for name in names {
                            let one = Bound {
                                verbs: vec![verb.clone()],
                                groups: vec![group.clone()],
                                resources: vec![resource.clone()],
                                names: name.into_iter().cloned().collect(),
                                ..rule.clone()
                            };
                            let matching: Vec<&Access> =
                                used.iter().filter(|a| one.allows(a)).collect();
                            let namespaces: BTreeSet<&str> = matching
                                .iter()
                                .filter_map(|a| a.namespace.as_deref())
                                .collect();
                            // Granted in every namespace, needed in a few.
                            let too_wide = rule.namespace.is_none()
                                && !matching.is_empty()
                                && matching.iter().all(|a| a.namespace.is_some())
                                && !self.any_namespace.contains(resource);
                            if too_wide {
                                let group = if group.is_empty() { "core" } else { group };
                                out.push(format!(
                                    "{verb} {group}/{resource} cluster-wide, needed only in namespace {} ({})",
                                    namespaces.into_iter().collect::<Vec<_>>().join(", "),
                                    rule.from
                                ));
                            } else if matching.is_empty() {
                                let scope = rule.namespace.as_deref().map_or_else(
                                    || "cluster-wide".to_owned(),
                                    |ns| format!("in namespace {ns}"),
                                );
                                let named = name.map(|n| format!(" {n:?}")).unwrap_or_default();
                                let group = if group.is_empty() { "core" } else { group };
                                out.push(format!(
                                    "{verb} {group}/{resource}{named} {scope} ({})",
                                    rule.from
                                ));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Whether no rule is bound at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(method: &str, target: &str, status: u16) -> Seen {
        Seen {
            method: method.into(),
            target: target.into(),
            content_type: None,
            status,
        }
    }

    fn check(method: &str, target: &str, status: u16, expected: &[&str]) {
        let got: Vec<String> = seen(method, target, status)
            .accesses()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, expected, "{method} {target}");
    }

    #[test]
    fn requests_become_the_checks_the_api_server_makes() {
        check(
            "GET",
            "/api/v1/nodes/n1",
            200,
            &["get core/nodes \"n1\" (cluster scope)"],
        );
        check(
            "GET",
            "/api/v1/nodes?fieldSelector=metadata.name%3Dn1&watch=true",
            200,
            &["watch core/nodes \"n1\" (cluster scope)"],
        );
        check(
            "GET",
            "/apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName%3Dn1%2Cspec.driver%3Dd",
            200,
            &["list resource.k8s.io/resourceslices (cluster scope)"],
        );
        check(
            "PATCH",
            "/api/v1/namespaces/ns/configmaps/cm?fieldManager=m",
            201,
            &[
                "patch core/configmaps \"cm\" in namespace ns",
                "create core/configmaps \"cm\" in namespace ns",
            ],
        );
        check(
            "PATCH",
            "/api/v1/namespaces/ns/configmaps/cm",
            200,
            &["patch core/configmaps \"cm\" in namespace ns"],
        );
        check(
            "POST",
            "/api/v1/namespaces/default/events",
            201,
            &["create core/events in namespace default"],
        );
        check(
            "DELETE",
            "/apis/resource.k8s.io/v1/resourceslices/s",
            200,
            &["delete resource.k8s.io/resourceslices \"s\" (cluster scope)"],
        );
        check("GET", "/version", 200, &[]);
    }

    const MANIFESTS: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: r}
rules:
  - apiGroups: [""]
    resources: ["nodes"]
    verbs: ["get", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: r}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: r}
subjects: [{kind: ServiceAccount, name: sa, namespace: ns}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: cm, namespace: ns}
rules:
  - apiGroups: [""]
    resources: ["configmaps"]
    resourceNames: ["one"]
    verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: cm, namespace: ns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm}
subjects: [{kind: ServiceAccount, name: sa, namespace: ns}]
"#;

    #[test]
    fn grants_are_compared_both_ways() {
        let g = Grants::of_service_account(MANIFESTS, "ns", "sa").unwrap();
        let used: Vec<Access> = [
            seen("GET", "/api/v1/nodes/n", 200),
            seen("GET", "/api/v1/namespaces/ns/configmaps/one", 200),
            seen("GET", "/api/v1/namespaces/other/configmaps/one", 200),
            seen("GET", "/api/v1/namespaces/ns/configmaps/two", 200),
        ]
        .iter()
        .flat_map(Seen::accesses)
        .collect();
        let denied: Vec<String> = g.denied(&used).iter().map(ToString::to_string).collect();
        assert_eq!(
            denied,
            [
                "get core/configmaps \"two\" in namespace ns",
                "get core/configmaps \"one\" in namespace other",
            ]
        );
        assert_eq!(
            g.unused(&used),
            ["patch core/nodes cluster-wide (ClusterRole r via ClusterRoleBinding r)"]
        );
        assert!(
            Grants::of_service_account(MANIFESTS, "other", "sa")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_cluster_wide_grant_used_in_one_namespace_is_too_wide() {
        let manifests = MANIFESTS.replace(
            "resources: [\"nodes\"]\n    verbs: [\"get\", \"patch\"]",
            "resources: [\"events\"]\n    verbs: [\"create\"]",
        );
        let used = seen("POST", "/api/v1/namespaces/default/events", 201).accesses();
        let g = Grants::of_service_account(&manifests, "ns", "sa").unwrap();
        assert_eq!(
            g.unused(&used)[0],
            "create core/events cluster-wide, needed only in namespace default (ClusterRole r via ClusterRoleBinding r)"
        );
        let anywhere = g.in_any_namespace("events");
        assert!(
            !anywhere.unused(&used)[0].contains("events"),
            "{:?}",
            anywhere.unused(&used)
        );
    }
}
