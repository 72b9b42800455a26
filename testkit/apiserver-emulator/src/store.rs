//! Objects and server-side apply on labels and annotations, with managed
//! fields, as the API server does it.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// Who owns which metadata keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manager {
    /// The field manager's name.
    pub name: String,
    /// `Apply` or `Update`.
    pub operation: &'static str,
    /// Owned label keys.
    pub labels: BTreeSet<String>,
    /// Owned annotation keys.
    pub annotations: BTreeSet<String>,
}

/// A Node (or any cluster-scoped object with metadata).
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.resourceVersion`.
    pub resource_version: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Managed fields.
    pub managers: Vec<Manager>,
    /// `status.nodeInfo.kubeletVersion`, as the kubelet reports it when it
    /// registers and updates its Node (`pkg/kubelet/nodestatus/setters.go`,
    /// `VersionInfo`: the kubelet's own `version.Get().String()`, e.g.
    /// `v1.34.1`); `None` leaves `status` empty.
    pub kubelet_version: Option<String>,
}

/// A conflict of a non-forced apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyConflict {
    /// The other manager.
    pub manager: String,
    /// `.metadata.labels.<key>` or `.metadata.annotations.<key>`.
    pub field: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Labels,
    Annotations,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Self::Labels => "labels",
            Self::Annotations => "annotations",
        }
    }
}

impl Object {
    /// A new object.
    #[must_use]
    pub fn new(name: &str, uid: u64, resource_version: u64) -> Self {
        Self {
            name: name.to_owned(),
            uid: format!("00000000-0000-4000-8000-{uid:012x}"),
            resource_version,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            managers: Vec::new(),
            kubelet_version: None,
        }
    }

    fn map(&mut self, part: Part) -> &mut BTreeMap<String, String> {
        match part {
            Part::Labels => &mut self.labels,
            Part::Annotations => &mut self.annotations,
        }
    }

    fn owned(m: &mut Manager, part: Part) -> &mut BTreeSet<String> {
        match part {
            Part::Labels => &mut m.labels,
            Part::Annotations => &mut m.annotations,
        }
    }

    /// Server-side apply of `labels` and `annotations` by `manager`.
    /// Without `force`, a key another manager owns with a different value is
    /// a conflict and nothing changes. Keys the manager applied before and
    /// no longer applies are released, and removed when nobody else owns
    /// them. Returns whether the object changed.
    ///
    /// # Errors
    /// The conflicts.
    pub fn apply(
        &mut self,
        manager: &str,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
        force: bool,
    ) -> Result<bool, Vec<ApplyConflict>> {
        let mut conflicts = Vec::new();
        for (part, wanted) in [(Part::Labels, labels), (Part::Annotations, annotations)] {
            for (k, v) in wanted {
                let current = self.map(part).get(k).cloned();
                if current.as_ref() == Some(v) {
                    continue;
                }
                for m in &self.managers {
                    let owns = match part {
                        Part::Labels => m.labels.contains(k),
                        Part::Annotations => m.annotations.contains(k),
                    };
                    if m.name != manager && owns {
                        conflicts.push(ApplyConflict {
                            manager: m.name.clone(),
                            field: format!(".metadata.{}.{k}", part.name()),
                        });
                    }
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(conflicts);
        }
        let before = self.clone();
        for (part, wanted) in [(Part::Labels, labels), (Part::Annotations, annotations)] {
            // Release what this manager no longer applies.
            let previously: BTreeSet<String> = self
                .managers
                .iter()
                .filter(|m| m.name == manager && m.operation == "Apply")
                .flat_map(|m| match part {
                    Part::Labels => m.labels.clone(),
                    Part::Annotations => m.annotations.clone(),
                })
                .collect();
            for k in previously.iter().filter(|k| !wanted.contains_key(*k)) {
                let others = self.managers.iter().any(|m| {
                    !(m.name == manager && m.operation == "Apply")
                        && match part {
                            Part::Labels => m.labels.contains(k),
                            Part::Annotations => m.annotations.contains(k),
                        }
                });
                if !others {
                    self.map(part).remove(k);
                }
            }
            for (k, v) in wanted {
                let changed_value = self.map(part).get(k) != Some(v);
                if changed_value {
                    // Forced or unowned: others lose the field.
                    for m in self.managers.iter_mut().filter(|m| m.name != manager) {
                        Self::owned(m, part).remove(k);
                    }
                }
                self.map(part).insert(k.clone(), v.clone());
            }
        }
        self.managers
            .retain(|m| !(m.name == manager && m.operation == "Apply"));
        self.managers.push(Manager {
            name: manager.to_owned(),
            operation: "Apply",
            labels: labels.keys().cloned().collect(),
            annotations: annotations.keys().cloned().collect(),
        });
        self.managers
            .retain(|m| !m.labels.is_empty() || !m.annotations.is_empty());
        self.managers
            .sort_by(|a, b| (&a.name, a.operation).cmp(&(&b.name, b.operation)));
        Ok(before.labels != self.labels
            || before.annotations != self.annotations
            || before.managers != self.managers)
    }

    /// A JSON merge patch of labels and annotations by `manager` (an
    /// `Update`): set values take the field from other managers, `null`
    /// removes it. Returns whether the object changed.
    pub fn merge(
        &mut self,
        manager: &str,
        labels: &Map<String, Value>,
        annotations: &Map<String, Value>,
    ) -> bool {
        let before = self.clone();
        for (part, patch) in [(Part::Labels, labels), (Part::Annotations, annotations)] {
            for (k, v) in patch {
                match v {
                    Value::String(s) => {
                        if self.map(part).get(k) != Some(s) {
                            for m in &mut self.managers {
                                Self::owned(m, part).remove(k);
                            }
                        }
                        self.map(part).insert(k.clone(), s.clone());
                        let entry = match self
                            .managers
                            .iter_mut()
                            .position(|m| m.name == manager && m.operation == "Update")
                        {
                            Some(i) => &mut self.managers[i],
                            None => {
                                self.managers.push(Manager {
                                    name: manager.to_owned(),
                                    operation: "Update",
                                    labels: BTreeSet::new(),
                                    annotations: BTreeSet::new(),
                                });
                                let last = self.managers.len() - 1;
                                &mut self.managers[last]
                            }
                        };
                        Self::owned(entry, part).insert(k.clone());
                    }
                    _ => {
                        self.map(part).remove(k);
                        for m in &mut self.managers {
                            Self::owned(m, part).remove(k);
                        }
                    }
                }
            }
        }
        self.managers
            .retain(|m| !m.labels.is_empty() || !m.annotations.is_empty());
        self.managers
            .sort_by(|a, b| (&a.name, a.operation).cmp(&(&b.name, b.operation)));
        before != *self
    }

    /// The object as the API server returns a Node.
    #[must_use]
    pub fn to_json(&self, kind: &str) -> Value {
        let fields = |m: &Manager| {
            let mut meta = Map::new();
            for (part, keys) in [("f:labels", &m.labels), ("f:annotations", &m.annotations)] {
                if !keys.is_empty() {
                    let inner: Map<String, Value> =
                        keys.iter().map(|k| (format!("f:{k}"), json!({}))).collect();
                    meta.insert(part.to_owned(), Value::Object(inner));
                }
            }
            json!({ "f:metadata": meta })
        };
        json!({
            "apiVersion": "v1",
            "kind": kind,
            "metadata": {
                "name": self.name,
                "uid": self.uid,
                "resourceVersion": self.resource_version.to_string(),
                "labels": self.labels,
                "annotations": self.annotations,
                "managedFields": self.managers.iter().map(|m| json!({
                    "manager": m.name,
                    "operation": m.operation,
                    "apiVersion": "v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields(m),
                })).collect::<Vec<_>>(),
            },
            "spec": {},
            "status": match &self.kubelet_version {
                Some(v) => json!({"nodeInfo": {"kubeletVersion": v}}),
                None => json!({}),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn apply_owns_releases_and_conflicts() {
        let mut o = Object::new("n", 1, 1);
        assert_eq!(
            o.apply("a", &m(&[("x", "1"), ("y", "2")]), &m(&[]), false),
            Ok(true)
        );
        assert_eq!(
            o.apply("a", &m(&[("x", "1"), ("y", "2")]), &m(&[]), false),
            Ok(false)
        );
        // Another manager sets y by hand (merge patch): it takes y.
        let mut patch = Map::new();
        patch.insert("y".into(), json!("9"));
        assert!(o.merge("kubectl", &patch, &Map::new()));
        // A non-forced apply of y=2 conflicts; nothing changes.
        let err = o
            .apply("a", &m(&[("x", "1"), ("y", "2")]), &m(&[]), false)
            .unwrap_err();
        assert_eq!(
            err,
            vec![ApplyConflict {
                manager: "kubectl".into(),
                field: ".metadata.labels.y".into()
            }]
        );
        assert_eq!(o.labels["y"], "9");
        // Dropping x releases and removes it; y is not ours any more.
        assert_eq!(o.apply("a", &m(&[]), &m(&[]), false), Ok(true));
        assert_eq!(o.labels, m(&[("y", "9")]));
        // Shared ownership of an equal value: released by one, kept by the other.
        o.apply("a", &m(&[("y", "9")]), &m(&[]), false).unwrap();
        o.apply("a", &m(&[]), &m(&[]), false).unwrap();
        assert_eq!(o.labels, m(&[("y", "9")]));
        // Forced apply takes the field.
        o.apply("a", &m(&[("y", "2")]), &m(&[]), true).unwrap();
        assert_eq!(o.labels["y"], "2");
        assert!(o.managers.iter().all(|m| m.name == "a"));
    }
}
