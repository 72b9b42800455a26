//! `intel-gpu-plugin inspect`: what the plugin sees and would do — the
//! answer to "why is my GPU not allocatable?".

use std::collections::BTreeMap;
use std::fmt::Write as _;

use gpu_discovery::Inventory;
use serde_json::{Value, json};

use crate::plan::{self, Memory, Options, ResourceKind};
use crate::temps;

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// Where a card's CDI spec stands on disk.
fn cdi_state(cdi_dir: &std::path::Path, card: &plan::Card, options: &Options) -> &'static str {
    // The CDI directory is shared with every CDI producer on the node: read
    // capped, never through a link, never blocking on a planted FIFO.
    match ops_kit::fs::read_capped(cdi_dir, &plan::cdi_file_name(card), 1 << 20) {
        Ok(bytes) if bytes == plan::cdi_spec(card, options.bypath).to_json().as_bytes() => {
            "written"
        }
        Ok(_) => "stale",
        Err(e) if e.is_not_found() => "missing",
        Err(_) => "unreadable",
    }
}

/// The report as JSON: the health the daemon would publish (device nodes,
/// driver, temperature under health management; kernel wedge and reset
/// events are seen only by the running daemon), and each card's CDI spec as
/// found in `cdi_dir` (an Allocate answer names it only when written).
#[must_use]
pub fn report(inventory: &Inventory, options: &Options, cdi_dir: &std::path::Path) -> Value {
    let mut memory = Memory::default();
    let readings = if options.temp_limit.is_some() {
        temps::read(inventory)
    } else {
        BTreeMap::new()
    };
    let mut plan = plan::plan(inventory, options, &mut memory, &temps::celsius(&readings));
    let mut cdi = BTreeMap::new();
    for card in plan.cards.values_mut() {
        let state = cdi_state(cdi_dir, card, options);
        card.cdi = state == "written";
        cdi.insert(card.index, state);
    }
    let cards: Vec<Value> = inventory
        .gpus
        .iter()
        .map(|g| {
            json!({
                "card": g.card,
                "pci_address": g.pci_address,
                "device_id": format!("{:#06x}", g.device_id),
                "driver": g.driver,
                "state": g.state,
                "state_reason": g.state_reason,
                "advertised": g.advertised,
                "reason": g.reason,
                "health": plan.cards.get(&g.index).map(|c| c.health.as_str()),
                "unhealthy_because": plan.cards.get(&g.index).and_then(|c| c.why.clone()),
                "temperature": readings.get(&g.index).map(|r| match r {
                    temps::Reading::Celsius(c) => json!(c),
                    temps::Reading::Suspended => json!("suspended, not read"),
                    temps::Reading::Unreadable(why) => json!(format!("unreadable: {why}")),
                }),
                "cdi_spec": cdi.get(&g.index),
                "warnings": g.warnings,
            })
        })
        .collect();
    let resources: Vec<Value> = plan
        .resources
        .iter()
        .map(|(name, (kind, list))| {
            let first = list.devices().first().map(|d| d.id.as_str().to_owned());
            let allocate = first.as_deref().map(|id| match plan::allocate(&plan, kind, &[id], options) {
                Ok(a) => json!({
                    "id": id,
                    "devices": a.devices.iter().map(|d| json!({"host_path": path(&d.host_path), "container_path": path(&d.container_path), "permissions": "rw"})).collect::<Vec<_>>(),
                    "mounts": a.mounts.iter().map(|m| json!({"host_path": path(&m.host_path), "container_path": path(&m.container_path), "read_only": m.read_only})).collect::<Vec<_>>(),
                    "cdi_devices": a.cdi_devices.iter().map(|c| c.as_str().to_owned()).collect::<Vec<_>>(),
                }),
                Err(e) => json!({"id": id, "error": e.to_string()}),
            });
            json!({
                "resource": name.as_str(),
                "kind": match kind { ResourceKind::Gpu(_) => "gpu", ResourceKind::Monitoring(_) => "monitoring" },
                "devices": list.devices().iter().map(|d| json!({"id": d.id.as_str(), "health": d.health.as_str(), "numa_nodes": d.numa_nodes})).collect::<Vec<_>>(),
                "allocate_example": allocate,
            })
        })
        .collect();
    json!({
        "cards": cards,
        "skipped": inventory.skipped,
        "resources": resources,
    })
}

/// The report as text.
#[must_use]
pub fn text(report: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let _ = writeln!(out, "Cards:");
    for c in report["cards"].as_array().into_iter().flatten() {
        let verdict = if c["advertised"].as_bool() == Some(true) {
            format!("advertised, {}", s(&c["health"]))
        } else {
            format!("NOT advertised: {}", s(&c["reason"]))
        };
        let _ = writeln!(
            out,
            "  {} {} {} driver={} state={} — {verdict}",
            s(&c["card"]),
            s(&c["pci_address"]),
            s(&c["device_id"]),
            s(&c["driver"]),
            s(&c["state"])
        );
        if !c["state_reason"].is_null() {
            let _ = writeln!(out, "      degraded: {}", s(&c["state_reason"]));
        }
        if !c["unhealthy_because"].is_null() && c["state_reason"].is_null() {
            let _ = writeln!(out, "      unhealthy: {}", s(&c["unhealthy_because"]));
        }
        if !c["temperature"].is_null() {
            let _ = writeln!(out, "      temperature: {}", s(&c["temperature"]));
        }
        if !c["cdi_spec"].is_null() {
            let _ = writeln!(out, "      CDI spec: {}", s(&c["cdi_spec"]));
        }
    }
    for sk in report["skipped"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  {} skipped: {}", s(&sk["entry"]), s(&sk["reason"]));
    }
    let _ = writeln!(out, "Resources:");
    let resources = report["resources"].as_array().cloned().unwrap_or_default();
    if resources.is_empty() {
        let _ = writeln!(out, "  none: no advertisable GPU (see the reasons above)");
    }
    for r in resources {
        let devices: Vec<String> = r["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let numa = d["numa_nodes"]
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .map(|a| format!(" numa={}", a[0]))
                    .unwrap_or_default();
                format!("{}({}{numa})", s(&d["id"]), s(&d["health"]))
            })
            .collect();
        let _ = writeln!(out, "  {}: {}", s(&r["resource"]), devices.join(" "));
        let a = &r["allocate_example"];
        if !a.is_null() {
            let nodes: Vec<String> = a["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| s(&d["host_path"]))
                .collect();
            let mounts: Vec<String> = a["mounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| s(&m["host_path"]))
                .collect();
            let cdi: Vec<String> = a["cdi_devices"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            let _ = writeln!(
                out,
                "    Allocate {}: nodes [{}] mounts [{}] cdi [{}]",
                s(&a["id"]),
                nodes.join(", "),
                mounts.join(", "),
                cdi.join(", ")
            );
        }
    }
    out
}
