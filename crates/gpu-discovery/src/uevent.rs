//! Kernel uevents and udev's re-broadcasts: a pure parser.
//!
//! Kernel format (netlink group 1): `ACTION@DEVPATH\0` then `KEY=VALUE\0`
//! pairs. udev format (group 2): the 8 bytes `libudev\0`, the magic
//! `0xfeedcafe` in network byte order, then (host byte order) the header
//! size, the properties' offset and length, then `KEY=VALUE\0` properties.

use std::collections::BTreeMap;
use std::fmt;

/// The most properties kept from one message.
pub const MAX_PROPERTIES: usize = 128;
/// The largest message accepted.
pub const MAX_MESSAGE: usize = 64 * 1024;

const UDEV_PREFIX: &[u8] = b"libudev\0";
const UDEV_MAGIC: u32 = 0xfeed_cafe;

/// Who sent the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The kernel (netlink group 1).
    Kernel,
    /// udev, after processing (netlink group 2).
    Udev,
}

/// What happened to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `add`
    Add,
    /// `remove`
    Remove,
    /// `change`
    Change,
    /// `move`
    Move,
    /// `online`
    Online,
    /// `offline`
    Offline,
    /// `bind`
    Bind,
    /// `unbind`
    Unbind,
    /// Anything else the kernel may add later.
    Other(String),
}

impl Action {
    fn parse(s: &str) -> Self {
        match s {
            "add" => Self::Add,
            "remove" => Self::Remove,
            "change" => Self::Change,
            "move" => Self::Move,
            "online" => Self::Online,
            "offline" => Self::Offline,
            "bind" => Self::Bind,
            "unbind" => Self::Unbind,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// One parsed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// Kernel or udev.
    pub origin: Origin,
    /// What happened.
    pub action: Action,
    /// The sysfs path below `/sys` (`/devices/pci0000:00/…`).
    pub devpath: String,
    /// `KEY=VALUE` properties (at most [`MAX_PROPERTIES`]).
    pub properties: BTreeMap<String, String>,
}

impl Uevent {
    /// The `SUBSYSTEM` property.
    #[must_use]
    pub fn subsystem(&self) -> Option<&str> {
        self.properties.get("SUBSYSTEM").map(String::as_str)
    }

    /// The DRM card (`cardN`) whose primary node this event is about: a
    /// `drm` event whose devpath ends in `/drm/cardN` (not a connector such
    /// as `cardN-DP-1`, not a render node).
    #[must_use]
    pub fn drm_card(&self) -> Option<&str> {
        if self.subsystem() != Some("drm") {
            return None;
        }
        let (parent, name) = self.devpath.rsplit_once('/')?;
        let digits = name.strip_prefix("card")?;
        let is_card = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
        (is_card && parent.ends_with("/drm")).then_some(name)
    }

    /// What a `change` event on a card says about its health (see
    /// [`HealthSignal`]); `None` for every other event.
    #[must_use]
    pub fn health_signal(&self) -> Option<HealthSignal> {
        if self.action != Action::Change || self.drm_card().is_none() {
            return None;
        }
        let get = |k: &str| self.properties.get(k).map(String::as_str);
        // drm_dev_wedged_event (Linux 6.15+), sent by i915 and xe.
        if let Some(methods) = get("WEDGED") {
            return Some(if methods == "none" {
                HealthSignal::Recovered
            } else {
                HealthSignal::Wedged(methods.to_owned())
            });
        }
        // i915's reset path: ERROR=1 and RESET=1 while it resets, ERROR=0
        // once the reset succeeded.
        match (get("ERROR"), get("RESET")) {
            (Some("0"), _) => Some(HealthSignal::Recovered),
            (Some("1"), _) => Some(HealthSignal::Error),
            (_, Some("1")) => Some(HealthSignal::Resetting),
            _ => None,
        }
    }

    /// Whether the event may change the GPU inventory: DRM, PCI, MEI and
    /// hwmon devices.
    #[must_use]
    pub fn concerns_gpus(&self) -> bool {
        matches!(
            self.subsystem(),
            Some("drm" | "pci" | "mei" | "hwmon" | "i915" | "xe")
        )
    }
}

/// What a card's `change` uevent says about its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthSignal {
    /// `WEDGED=<methods>`: the GPU is unusable until recovered by one of the
    /// methods (`rebind`, `bus-reset`, `vendor-specific`, `unknown`).
    Wedged(String),
    /// i915 `ERROR=1`: a GPU hang was detected.
    Error,
    /// i915 `RESET=1`: the GPU is being reset.
    Resetting,
    /// `WEDGED=none` or i915 `ERROR=0`: the driver recovered.
    Recovered,
}

/// A message that is not a uevent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UeventError {
    /// Larger than [`MAX_MESSAGE`].
    #[error("uevent of {0} bytes is larger than {MAX_MESSAGE}")]
    TooLarge(usize),
    /// The kernel header `ACTION@DEVPATH` is missing or malformed.
    #[error("uevent header is not ACTION@DEVPATH")]
    BadHeader,
    /// The udev header is truncated or its magic or offsets are wrong.
    #[error("udev message header is malformed: {0}")]
    BadUdevHeader(&'static str),
    /// The `ACTION` or `DEVPATH` property is missing.
    #[error("uevent lacks the {0} property")]
    Missing(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Udev => "udev",
        })
    }
}

/// Parses a netlink uevent message in either format.
///
/// # Errors
/// See [`UeventError`]. Never panics, whatever the bytes.
pub fn parse(msg: &[u8]) -> Result<Uevent, UeventError> {
    if msg.len() > MAX_MESSAGE {
        return Err(UeventError::TooLarge(msg.len()));
    }
    if msg.starts_with(UDEV_PREFIX) {
        return parse_udev(msg);
    }
    let mut fields = msg.split(|b| *b == 0);
    let header = fields.next().ok_or(UeventError::BadHeader)?;
    let header = std::str::from_utf8(header).map_err(|_| UeventError::BadHeader)?;
    let (action, devpath) = header.split_once('@').ok_or(UeventError::BadHeader)?;
    if action.is_empty() || !devpath.starts_with('/') {
        return Err(UeventError::BadHeader);
    }
    let properties = properties(fields);
    Ok(Uevent {
        origin: Origin::Kernel,
        action: Action::parse(action),
        devpath: devpath.to_owned(),
        properties,
    })
}

fn parse_udev(msg: &[u8]) -> Result<Uevent, UeventError> {
    let word = |at: usize, be: bool| -> Option<u32> {
        let b: [u8; 4] = msg.get(at..at + 4)?.try_into().ok()?;
        Some(if be {
            u32::from_be_bytes(b)
        } else {
            u32::from_ne_bytes(b)
        })
    };
    let magic = word(8, true).ok_or(UeventError::BadUdevHeader("truncated"))?;
    if magic != UDEV_MAGIC {
        return Err(UeventError::BadUdevHeader("wrong magic"));
    }
    let header_size = word(12, false).ok_or(UeventError::BadUdevHeader("truncated"))? as usize;
    let off = word(16, false).ok_or(UeventError::BadUdevHeader("truncated"))? as usize;
    let len = word(20, false).ok_or(UeventError::BadUdevHeader("truncated"))? as usize;
    if header_size < 24
        || off < header_size
        || off.checked_add(len).is_none_or(|end| end > msg.len())
    {
        return Err(UeventError::BadUdevHeader("offsets outside the message"));
    }
    let props = properties(msg[off..off + len].split(|b| *b == 0));
    let action = props.get("ACTION").ok_or(UeventError::Missing("ACTION"))?;
    let devpath = props
        .get("DEVPATH")
        .ok_or(UeventError::Missing("DEVPATH"))?;
    Ok(Uevent {
        origin: Origin::Udev,
        action: Action::parse(action),
        devpath: devpath.clone(),
        properties: props.clone(),
    })
}

fn properties<'a>(fields: impl Iterator<Item = &'a [u8]>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for field in fields {
        if out.len() >= MAX_PROPERTIES {
            break;
        }
        let Ok(text) = std::str::from_utf8(field) else {
            continue;
        };
        if let Some((k, v)) = text.split_once('=')
            && !k.is_empty()
        {
            out.insert(k.to_owned(), v.to_owned());
        }
    }
    out
}

/// Renders a kernel-format message (for tests and event injection).
#[must_use]
pub fn kernel_message(action: &str, devpath: &str, properties: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("{action}@{devpath}\0").into_bytes();
    for (k, v) in [("ACTION", action), ("DEVPATH", devpath)]
        .iter()
        .chain(properties)
    {
        out.extend_from_slice(format!("{k}={v}\0").as_bytes());
    }
    out
}

/// Renders a udev-format message (for tests).
#[must_use]
pub fn udev_message(properties: &[(&str, &str)]) -> Vec<u8> {
    let mut props = Vec::new();
    for (k, v) in properties {
        props.extend_from_slice(format!("{k}={v}\0").as_bytes());
    }
    let header_size: u32 = 40;
    let mut out = UDEV_PREFIX.to_vec();
    out.extend_from_slice(&UDEV_MAGIC.to_be_bytes());
    out.extend_from_slice(&header_size.to_ne_bytes());
    out.extend_from_slice(&header_size.to_ne_bytes());
    out.extend_from_slice(&u32::try_from(props.len()).unwrap_or(u32::MAX).to_ne_bytes());
    out.resize(header_size as usize, 0);
    out.extend_from_slice(&props);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn health_signals() {
        use super::HealthSignal::*;
        let card = "/devices/pci0000:00/0000:03:00.0/drm/card1";
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a [(&'a str, &'a str)],
            Option<super::HealthSignal>,
        );
        let cases: &[Case<'_>] = &[
            (
                "change",
                card,
                &[("WEDGED", "rebind,bus-reset")],
                Some(Wedged("rebind,bus-reset".into())),
            ),
            (
                "change",
                card,
                &[("WEDGED", "vendor-specific")],
                Some(Wedged("vendor-specific".into())),
            ),
            ("change", card, &[("WEDGED", "none")], Some(Recovered)),
            ("change", card, &[("ERROR", "1")], Some(Error)),
            ("change", card, &[("RESET", "1")], Some(Resetting)),
            ("change", card, &[("ERROR", "0")], Some(Recovered)),
            ("change", card, &[("HOTPLUG", "1")], None),
            ("add", card, &[("WEDGED", "rebind")], None),
            (
                "change",
                "/devices/pci0000:00/0000:03:00.0/drm/renderD128",
                &[("WEDGED", "rebind")],
                None,
            ),
        ];
        for (action, devpath, props, want) in cases {
            let mut all = vec![("SUBSYSTEM", "drm")];
            all.extend_from_slice(props);
            let e = super::parse(&super::kernel_message(action, devpath, &all)).unwrap();
            assert_eq!(e.health_signal(), *want, "{action} {devpath} {props:?}");
        }
    }

    #[test]
    fn drm_card_names_only_primary_nodes() {
        let cases = [
            (
                "/devices/pci0000:00/0000:03:00.0/drm/card1",
                "drm",
                Some("card1"),
            ),
            (
                "/devices/pci0000:00/0000:03:00.0/drm/card12",
                "drm",
                Some("card12"),
            ),
            (
                "/devices/pci0000:00/0000:03:00.0/drm/renderD128",
                "drm",
                None,
            ),
            (
                "/devices/pci0000:00/0000:03:00.0/drm/card1/card1-DP-1",
                "drm",
                None,
            ),
            ("/devices/pci0000:00/0000:03:00.0/drm/card", "drm", None),
            ("/devices/pci0000:00/0000:03:00.0", "pci", None),
            ("/devices/virtual/misc/card1", "drm", None),
        ];
        for (devpath, subsystem, want) in cases {
            let e = super::parse(&super::kernel_message(
                "remove",
                devpath,
                &[("SUBSYSTEM", subsystem)],
            ))
            .unwrap();
            assert_eq!(e.drm_card(), want, "{devpath}");
        }
    }

    use super::*;

    #[test]
    fn kernel_messages() {
        let msg = kernel_message(
            "add",
            "/devices/pci0000:00/0000:03:00.0/drm/card1",
            &[("SUBSYSTEM", "drm"), ("DEVNAME", "dri/card1")],
        );
        let e = parse(&msg).unwrap();
        assert_eq!(e.origin, Origin::Kernel);
        assert_eq!(e.action, Action::Add);
        assert_eq!(e.devpath, "/devices/pci0000:00/0000:03:00.0/drm/card1");
        assert_eq!(e.subsystem(), Some("drm"));
        assert!(e.concerns_gpus());
        assert_eq!(e.properties["DEVNAME"], "dri/card1");
        let net = parse(&kernel_message(
            "add",
            "/devices/virtual/net/veth0",
            &[("SUBSYSTEM", "net")],
        ))
        .unwrap();
        assert!(!net.concerns_gpus());
        assert_eq!(
            parse(&kernel_message("frobnicate", "/x", &[]))
                .unwrap()
                .action,
            Action::Other("frobnicate".into())
        );
    }

    #[test]
    fn udev_messages() {
        let msg = udev_message(&[
            ("ACTION", "remove"),
            ("DEVPATH", "/devices/x/drm/card2"),
            ("SUBSYSTEM", "drm"),
        ]);
        let e = parse(&msg).unwrap();
        assert_eq!((e.origin, e.action.clone()), (Origin::Udev, Action::Remove));
        assert_eq!(e.devpath, "/devices/x/drm/card2");
        let mut bad = msg.clone();
        bad[8] = 0;
        assert_eq!(parse(&bad), Err(UeventError::BadUdevHeader("wrong magic")));
        assert_eq!(
            parse(&msg[..20]),
            Err(UeventError::BadUdevHeader("truncated"))
        );
        assert_eq!(
            parse(&udev_message(&[("DEVPATH", "/x")])),
            Err(UeventError::Missing("ACTION"))
        );
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [&b""[..], b"add", b"@/x", b"add@relative\0", b"\xff@/x\0"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse(&vec![b'a'; MAX_MESSAGE + 1]),
            Err(UeventError::TooLarge(MAX_MESSAGE + 1))
        );
    }
}
