//! Test kit: faithful sysfs and devfs trees of Intel GPU nodes, built in a
//! directory from a declarative [`NodeSpec`] (in code, or loaded from TOML
//! or JSON), and changed in place to simulate hotplug.
//!
//! The layout follows the kernel's: `sys/devices/pci…/<bdf>/` with
//! `vendor`, `device`, `class`, `driver`, `drm/cardN`, SR-IOV links, tiles,
//! hwmon and MEI; `sys/class/drm/` links (cards, render nodes, connectors,
//! `version`); `dev/dri/` nodes (plain files: no root needed) and
//! `dev/dri/by-path/` links.
//!
//! ```
//! use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec};
//!
//! let dir = tempfile::tempdir()?;
//! let node = FakeNode::build(dir.path(), &NodeSpec::starlingx_edge())?;
//! node.add_gpu(&GpuSpec::new(9).device("0xe20b").driver(Some("xe")))?;
//! node.remove_gpu(9)?;
//! assert!(node.sysfs_root().join("class/drm/card1").exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Never a dependency of a shipped binary.

mod spec;

use std::path::{Component, Path, PathBuf};

pub use spec::{Broken, GpuSpec, NodeSpec, SriovSpec};

/// Why a fake node could not be built or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FakeNodeError {
    /// A file system operation failed.
    #[error("fake node: could not write {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A description file is invalid.
    #[error("fake node description {}: {message}", path.display())]
    Spec {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The card does not exist in the tree.
    #[error("fake node: no card{0}")]
    NoSuchCard(u32),
}

type Result<T> = std::result::Result<T, FakeNodeError>;

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|source| FakeNodeError::Io {
        path: path.to_owned(),
        source,
    })
}

/// A fake node rooted at a directory: `<root>/sys` and `<root>/dev`.
#[derive(Debug, Clone)]
pub struct FakeNode {
    root: PathBuf,
}

impl FakeNode {
    /// An empty node (DRM class directory, no GPUs).
    ///
    /// # Errors
    /// When the directories cannot be created.
    pub fn create(root: &Path) -> Result<Self> {
        let node = Self {
            root: root.to_owned(),
        };
        for dir in [
            "sys/class/drm",
            "sys/devices",
            "sys/bus/pci/drivers",
            "dev/dri/by-path",
        ] {
            mkdir(&root.join(dir))?;
        }
        write(&root.join("sys/class/drm/version"), "drm 1.1.0 20060810\n")?;
        Ok(node)
    }

    /// A node with the GPUs of `spec` (and their VFs).
    ///
    /// # Errors
    /// When the tree cannot be written.
    pub fn build(root: &Path, spec: &NodeSpec) -> Result<Self> {
        let node = Self::create(root)?;
        for gpu in &spec.gpus {
            node.add_gpu(gpu)?;
        }
        Ok(node)
    }

    /// Where the fake sysfs is.
    #[must_use]
    pub fn sysfs_root(&self) -> PathBuf {
        self.root.join("sys")
    }

    /// Where the fake devfs is.
    #[must_use]
    pub fn devfs_root(&self) -> PathBuf {
        self.root.join("dev")
    }

    /// The PCI directory of a function.
    fn pci_dir(&self, spec: &GpuSpec) -> PathBuf {
        let address = spec.address();
        let domain = address.get(..4).unwrap_or("0000");
        let mut dir = self
            .root
            .join("sys/devices")
            .join(format!("pci{domain}:00"));
        for bridge in &spec.bridges {
            dir.push(bridge);
        }
        dir.join(address)
    }

    /// Adds a GPU (and, for a PF, its enabled VFs), as a hotplug would.
    ///
    /// # Errors
    /// When the tree cannot be written.
    pub fn add_gpu(&self, spec: &GpuSpec) -> Result<()> {
        self.add_function(spec, None)?;
        let pf_dir = self.pci_dir(spec);
        for (i, vf) in spec.vf_specs().iter().enumerate() {
            self.add_function(vf, Some(&pf_dir))?;
            symlink(&self.pci_dir(vf), &pf_dir.join(format!("virtfn{i}")))?;
        }
        Ok(())
    }

    /// Hot-adds a GPU (and its enabled VFs) in the order the kernel and
    /// udev take: the sysfs directories and the devtmpfs nodes exist before
    /// the kernel announces the `add` uevent of each DRM minor (`announce`
    /// is called there, in the kernel's order); udev creates the by-path
    /// links only after that.
    ///
    /// # Errors
    /// When the tree cannot be written.
    pub fn plug_gpu(&self, spec: &GpuSpec, mut announce: impl FnMut(&KernelEvent)) -> Result<()> {
        let mut unlinked = spec.clone();
        unlinked.by_path = false;
        self.add_gpu(&unlinked)?;
        let mut functions = vec![spec.clone()];
        functions.extend(spec.vf_specs());
        for f in &functions {
            for event in self.minor_events("add", f) {
                announce(&event);
            }
        }
        if spec.by_path {
            for f in &functions {
                self.create_by_path(f)?;
            }
        }
        Ok(())
    }

    /// Hot-removes a GPU (a PF takes its VFs) in the kernel's order
    /// (`device_del`, drivers/base/core.c): for each DRM minor, primary
    /// before render (`drm_dev_unregister`), its devtmpfs node and class
    /// links go, then the kernel announces its `remove` uevent (`announce`);
    /// then the sysfs directories go; udev removes the by-path links last.
    ///
    /// # Errors
    /// When the card does not exist or the tree cannot be changed.
    pub fn unplug_gpu(&self, card: u32, mut announce: impl FnMut(&KernelEvent)) -> Result<()> {
        let dev = self.card_device(card)?;
        let mut functions = Vec::new();
        for vf in list(&dev).into_iter().filter(|n| n.starts_with("virtfn")) {
            if let Ok(vf_dev) = std::fs::canonicalize(dev.join(&vf)) {
                functions.push(vf_dev);
            }
        }
        functions.push(dev.clone());
        let dri = self.root.join("dev/dri");
        let class = self.root.join("sys/class/drm");
        for f in &functions {
            let mut minors = list(&f.join("drm"));
            // `drm_dev_unregister` (drivers/gpu/drm/drm_drv.c) unregisters
            // the primary minor before the render minor: card, then render.
            minors.sort_by_key(|m| !m.starts_with("card"));
            for m in &minors {
                // `device_del` (drivers/base/core.c): the devtmpfs node and
                // the class links go, then the remove uevent, then the
                // device's directory.
                remove(&dri.join(m))?;
                for entry in list(&class) {
                    if entry == *m || entry.starts_with(&format!("{m}-")) {
                        remove(&class.join(&entry))?;
                    }
                }
                announce(&KernelEvent::minor(
                    "remove",
                    &self.devpath(&f.join("drm").join(m)),
                    m,
                ));
            }
        }
        // Then the directories, and last udev's links.
        for f in &functions {
            let _ = std::fs::remove_file(f.join("physfn"));
            io(f, std::fs::remove_dir_all(f))?;
        }
        for f in &functions {
            self.remove_by_path(f)?;
        }
        Ok(())
    }

    /// The path below `/sys` that a uevent names.
    fn devpath(&self, dir: &Path) -> String {
        let sys = self.root.join("sys");
        format!("/{}", dir.strip_prefix(&sys).unwrap_or(dir).display())
    }

    fn minor_events(&self, action: &'static str, spec: &GpuSpec) -> Vec<KernelEvent> {
        let drm = self.pci_dir(spec).join("drm");
        let mut minors = list(&drm);
        // `drm_dev_register` (drivers/gpu/drm/drm_drv.c) registers the
        // render minor before the primary one: render, then card.
        minors.sort_by_key(|m| m.starts_with("card"));
        minors
            .iter()
            .map(|m| KernelEvent::minor(action, &self.devpath(&drm.join(m)), m))
            .collect()
    }

    fn create_by_path(&self, spec: &GpuSpec) -> Result<()> {
        let dri = self.root.join("dev/dri");
        let address = spec.address();
        for (node, kind) in [
            (format!("card{}", spec.card), "card"),
            (format!("renderD{}", spec.render_number()), "render"),
        ] {
            symlink(
                &dri.join(node),
                &dri.join(format!("by-path/pci-{address}-{kind}")),
            )?;
        }
        Ok(())
    }

    fn add_function(&self, spec: &GpuSpec, pf: Option<&Path>) -> Result<()> {
        let dev = self.pci_dir(spec);
        mkdir(&dev)?;
        let card = format!("card{}", spec.card);
        let render = format!("renderD{}", spec.render_number());
        let broken = |b: Broken| spec.broken.contains(&b);

        if broken(Broken::GarbageVendor) {
            write(&dev.join("vendor"), "intel, probably\n")?;
        } else if !broken(Broken::MissingVendor) {
            write(&dev.join("vendor"), &format!("{}\n", spec.vendor))?;
        }
        if broken(Broken::NonUtf8Device) {
            io(
                &dev.join("device"),
                std::fs::write(dev.join("device"), b"0x\xff\xfe\n"),
            )?;
        } else {
            write(&dev.join("device"), &format!("{}\n", spec.device))?;
        }
        if broken(Broken::OversizedClass) {
            write(&dev.join("class"), &"0".repeat(10_000))?;
        } else {
            write(&dev.join("class"), &format!("{}\n", spec.class))?;
        }
        let numa = if broken(Broken::GarbageNuma) {
            "NaN".to_owned()
        } else {
            spec.numa_node.to_string()
        };
        write(&dev.join("numa_node"), &format!("{numa}\n"))?;
        if let Some(cpus) = &spec.local_cpulist {
            write(&dev.join("local_cpulist"), &format!("{cpus}\n"))?;
        }
        if let Some(driver) = &spec.driver {
            let drv = self.root.join("sys/bus/pci/drivers").join(driver);
            mkdir(&drv)?;
            symlink(&drv, &dev.join("driver"))?;
        }
        if let Some(pf) = pf {
            symlink(pf, &dev.join("physfn"))?;
        }
        if let Some(sriov) = &spec.sriov {
            write(
                &dev.join("sriov_totalvfs"),
                &format!("{}\n", sriov.total_vfs),
            )?;
            let num = if broken(Broken::GarbageNumVfs) {
                "many".to_owned()
            } else {
                sriov.enabled_vfs.to_string()
            };
            write(&dev.join("sriov_numvfs"), &format!("{num}\n"))?;
        }
        let is_xe = spec.driver.as_deref() == Some("xe");
        for t in 0..spec.tiles {
            if is_xe {
                let tile = dev.join(format!("tile{t}"));
                mkdir(&tile.join("gt0"))?;
                if let Some(v) = spec.vram_bytes_per_tile {
                    write(&tile.join("physical_vram_size_bytes"), &format!("{v}\n"))?;
                }
            }
        }
        if let Some(t) = spec.temperature_mdeg {
            write(&dev.join("hwmon/hwmon0/temp1_input"), &format!("{t}\n"))?;
            write(
                &dev.join("hwmon/hwmon0/name"),
                &format!("{}\n", spec.driver.as_deref().unwrap_or("gpu")),
            )?;
        }
        if let Some(m) = spec.mei {
            let driver = spec.driver.as_deref().unwrap_or("i915");
            mkdir(
                &dev.join(format!("{driver}.mei-gscfi.{}", 0x300 + m))
                    .join("mei")
                    .join(format!("mei{m}")),
            )?;
        }

        // DRM minors under the PCI function, and the class links.
        let drm = dev.join("drm");
        let card_dir = drm.join(&card);
        mkdir(&card_dir)?;
        write(&card_dir.join("dev"), &format!("226:{}\n", spec.card))?;
        symlink(&dev, &card_dir.join("device"))?;
        if !is_xe {
            for t in 0..spec.tiles {
                mkdir(&card_dir.join(format!("gt/gt{t}")))?;
            }
        }
        if let Some(l) = spec.lmem_total_bytes {
            write(&card_dir.join("lmem_total_bytes"), &format!("{l}\n"))?;
        }
        let render_dir = drm.join(&render);
        mkdir(&render_dir)?;
        symlink(&dev, &render_dir.join("device"))?;
        let class = self.root.join("sys/class/drm");
        symlink(&render_dir, &class.join(&render))?;
        for c in &spec.connectors {
            let conn = card_dir.join(format!("{card}-{c}"));
            mkdir(&conn)?;
            write(&conn.join("status"), "disconnected\n")?;
            symlink(&conn, &class.join(format!("{card}-{c}")))?;
        }
        let class_link = class.join(&card);
        if broken(Broken::LoopingLink) {
            let other = class.join(format!("{card}.loop"));
            symlink(&class_link, &other)?;
            symlink(&other, &class_link)?;
        } else if broken(Broken::DanglingLink) {
            symlink(&dev.join("gone/drm").join(&card), &class_link)?;
        } else if broken(Broken::NotPci) {
            let platform = self.root.join("sys/devices/platform/simple-framebuffer.0");
            mkdir(&platform.join("drm").join(&card))?;
            symlink(&platform, &platform.join("drm").join(&card).join("device"))?;
            write(&platform.join("vendor"), "0x8086\n")?;
            symlink(&platform.join("drm").join(&card), &class_link)?;
        } else {
            symlink(&card_dir, &class_link)?;
        }

        // devfs.
        if spec.nodes {
            self.create_nodes(spec)?;
        }
        Ok(())
    }

    fn create_nodes(&self, spec: &GpuSpec) -> Result<()> {
        let dri = self.root.join("dev/dri");
        let card = format!("card{}", spec.card);
        let render = format!("renderD{}", spec.render_number());
        write(&dri.join(&card), "")?;
        write(&dri.join(&render), "")?;
        if spec.by_path {
            let address = spec.address();
            symlink(
                &dri.join(&card),
                &dri.join(format!("by-path/pci-{address}-card")),
            )?;
            symlink(
                &dri.join(&render),
                &dri.join(format!("by-path/pci-{address}-render")),
            )?;
        }
        Ok(())
    }

    /// The PCI directory of a card, from the tree.
    fn card_device(&self, card: u32) -> Result<PathBuf> {
        let link = self.root.join(format!("sys/class/drm/card{card}/device"));
        std::fs::canonicalize(&link).map_err(|_| FakeNodeError::NoSuchCard(card))
    }

    /// Removes a GPU as a hot-unplug would: its class links, device nodes,
    /// by-path links and PCI directory — and, for a PF, its VFs' cards.
    ///
    /// # Errors
    /// When the card does not exist or the tree cannot be changed.
    pub fn remove_gpu(&self, card: u32) -> Result<()> {
        let dev = self.card_device(card)?;
        // VFs first.
        for vf in list(&dev).into_iter().filter(|n| n.starts_with("virtfn")) {
            if let Ok(vf_dev) = std::fs::canonicalize(dev.join(&vf)) {
                for c in cards_of(&vf_dev) {
                    self.remove_function(c, &vf_dev)?;
                }
            }
        }
        self.remove_function(card, &dev)
    }

    fn remove_function(&self, card: u32, dev: &Path) -> Result<()> {
        let minors = list(&dev.join("drm"));
        let class = self.root.join("sys/class/drm");
        let dri = self.root.join("dev/dri");
        let card_name = format!("card{card}");
        for entry in list(&class) {
            let ours = minors.contains(&entry) || entry.starts_with(&format!("{card_name}-"));
            if ours {
                remove(&class.join(&entry))?;
            }
        }
        for m in &minors {
            remove(&dri.join(m))?;
        }
        self.remove_by_path(dev)?;
        let _ = std::fs::remove_file(dev.join("physfn"));
        io(dev, std::fs::remove_dir_all(dev))
    }

    fn remove_by_path(&self, dev: &Path) -> Result<()> {
        let address = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let by_path = self.root.join("dev/dri/by-path");
        for entry in list(&by_path) {
            if entry.starts_with(&format!("pci-{address}-")) {
                remove(&by_path.join(entry))?;
            }
        }
        Ok(())
    }

    /// Unbinds the card's driver (its DRM nodes stay, as a test of the
    /// degraded state).
    ///
    /// # Errors
    /// When the card does not exist.
    pub fn unbind_driver(&self, card: u32) -> Result<()> {
        let dev = self.card_device(card)?;
        remove(&dev.join("driver"))
    }

    /// Binds the card to `driver`.
    ///
    /// # Errors
    /// When the card does not exist or the tree cannot be changed.
    pub fn bind_driver(&self, card: u32, driver: &str) -> Result<()> {
        let dev = self.card_device(card)?;
        remove(&dev.join("driver"))?;
        let drv = self.root.join("sys/bus/pci/drivers").join(driver);
        mkdir(&drv)?;
        symlink(&drv, &dev.join("driver"))
    }

    /// Removes the card's device nodes and by-path links from devfs.
    ///
    /// # Errors
    /// When the card does not exist or the tree cannot be changed.
    pub fn remove_device_nodes(&self, card: u32) -> Result<()> {
        let dev = self.card_device(card)?;
        for m in list(&dev.join("drm")) {
            remove(&self.root.join("dev/dri").join(m))?;
        }
        self.remove_by_path(&dev)
    }

    /// Creates the card's device nodes and by-path links again (after
    /// [`FakeNode::remove_device_nodes`]), from its `drm/` entries.
    ///
    /// # Errors
    /// When the card does not exist or the tree cannot be changed.
    pub fn create_device_nodes(&self, card: u32) -> Result<()> {
        let dev = self.card_device(card)?;
        let address = dev
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let dri = self.root.join("dev/dri");
        for m in list(&dev.join("drm")) {
            write(&dri.join(&m), "")?;
            let kind = if m.starts_with("render") {
                "render"
            } else {
                "card"
            };
            symlink(
                &dri.join(&m),
                &dri.join(format!("by-path/pci-{address}-{kind}")),
            )?;
        }
        Ok(())
    }

    /// Writes a sysfs attribute of the card's PCI function (relative path,
    /// e.g. `hwmon/hwmon0/temp1_input`).
    ///
    /// # Errors
    /// When the card does not exist or the file cannot be written.
    pub fn set_attribute(&self, card: u32, name: &str, value: &str) -> Result<()> {
        let dev = self.card_device(card)?;
        write(&dev.join(name), value)
    }
}

/// A uevent the kernel sends during a hotplug, as [`FakeNode::plug_gpu`] and
/// [`FakeNode::unplug_gpu`] announce it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEvent {
    /// `add` or `remove`.
    pub action: &'static str,
    /// The path below `/sys`, e.g. `/devices/pci0000:00/0000:03:00.0/drm/card1`.
    pub devpath: String,
    /// `SUBSYSTEM`, `DEVNAME`, … in the kernel's order.
    pub properties: Vec<(&'static str, String)>,
}

impl KernelEvent {
    fn minor(action: &'static str, devpath: &str, name: &str) -> Self {
        Self {
            action,
            devpath: devpath.to_owned(),
            properties: vec![
                ("SUBSYSTEM", "drm".to_owned()),
                ("DEVNAME", format!("dri/{name}")),
                ("DEVTYPE", "drm_minor".to_owned()),
            ],
        }
    }

    /// The kernel's wire format (netlink group 1): `ACTION@DEVPATH`, then
    /// `KEY=VALUE` pairs, each ended by a NUL.
    #[must_use]
    pub fn to_kernel_message(&self) -> Vec<u8> {
        let mut out = format!("{}@{}\0", self.action, self.devpath).into_bytes();
        out.extend_from_slice(
            format!("ACTION={}\0DEVPATH={}\0", self.action, self.devpath).as_bytes(),
        );
        for (k, v) in &self.properties {
            out.extend_from_slice(format!("{k}={v}\0").as_bytes());
        }
        out
    }
}

/// The netlink port [`inject_uevent`] sends from: the test kernel's port,
/// which a watcher under test is told to trust (the real kernel's is 0).
pub const FAKE_KERNEL_PORT: u32 = 0x6b65_726e;

/// Sends a kernel-format uevent message to netlink group 1 of the current
/// network namespace, as the kernel would. Needs root in the namespace's
/// user namespace (e.g. under `unshare --user --map-root-user --net`, where
/// it is also hermetic); fails with `EPERM` otherwise.
///
/// # Errors
/// When the socket cannot be opened or the message not sent.
pub fn inject_uevent(message: &[u8]) -> std::io::Result<()> {
    // The kernel sends from port 0, which no process can bind: a watcher
    // under test is told to trust this port instead
    // (`WatcherConfig::trust_uevent_port`).
    send_uevent_from(FAKE_KERNEL_PORT, 1, message)
}

/// Sends `message` from netlink port `port` to the uevent multicast
/// `group` (1: the kernel's, 2: udev's), as any process with
/// `CAP_NET_ADMIN` in the network namespace can: for tests of forged
/// uevents. Needs what [`inject_uevent`] needs.
///
/// # Errors
/// When the socket cannot be opened, bound or the message not sent.
pub fn send_uevent_from(port: u32, group: u32, message: &[u8]) -> std::io::Result<()> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, sendto,
        socket,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(port, 0))?;
    sendto(
        fd.as_raw_fd(),
        message,
        &NetlinkAddr::new(0, group),
        MsgFlags::empty(),
    )?;
    Ok(())
}

/// The `unshare` arguments of a hermetic namespace with a root mapping.
pub const UNSHARE: [&str; 3] = ["--user", "--map-root-user", "--net"];

/// Runs `command` (typically the current test or benchmark binary again)
/// inside `unshare --user --map-root-user --net`, where it is root of a
/// hermetic network namespace and may inject uevents. Returns the child's
/// output, or `Err(reason)` when such namespaces are not permitted here (the
/// caller reports that it skipped).
///
/// # Errors
/// The reason namespaces cannot be used.
pub fn run_hermetic(
    command: &std::path::Path,
    args: &[&str],
    env: (&str, &str),
) -> std::result::Result<std::process::Output, String> {
    use std::process::Command;
    match Command::new("unshare").args(UNSHARE).arg("true").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(format!(
                "user+net namespaces are not permitted here ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Err(e) => return Err(format!("no unshare command ({e})")),
    }
    Command::new("unshare")
        .args(UNSHARE)
        .arg(command)
        .args(args)
        .env(env.0, env.1)
        .output()
        .map_err(|e| format!("could not run unshare: {e}"))
}

nix::ioctl_read_bad!(get_flags, nix::libc::SIOCGIFFLAGS, nix::libc::ifreq);
nix::ioctl_write_ptr_bad!(set_flags, nix::libc::SIOCSIFFLAGS, nix::libc::ifreq);

/// Brings up the loopback interface of the current network namespace (a
/// new one starts with `lo` down, so nothing can connect to 127.0.0.1):
/// for a hermetic child that also runs the API-server emulator. Needs
/// CAP_NET_ADMIN there (root of the user namespace).
///
/// # Errors
/// The OS error.
pub fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: `ifreq` is plain old data (a name and a union of integers and
    // addresses); all zeroes is a valid value of it.
    let mut req: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = nix::libc::c_char::try_from(*src).unwrap_or(0);
    }
    // SAFETY: a valid socket and an `ifreq` naming an interface; the
    // kernel writes the flags into the union.
    unsafe { get_flags(sock.as_raw_fd(), &mut req) }?;
    // SAFETY: SIOCGIFFLAGS filled `ifru_flags`, the union member read.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | nix::libc::c_short::try_from(nix::libc::IFF_UP).unwrap_or(1);
    // SAFETY: a valid socket and an `ifreq` with the name and the flags set.
    unsafe { set_flags(sock.as_raw_fd(), &req) }?;
    Ok(())
}

/// The card numbers under a PCI function's `drm/`.
fn cards_of(dev: &Path) -> Vec<u32> {
    list(&dev.join("drm"))
        .iter()
        .filter_map(|n| n.strip_prefix("card")?.parse().ok())
        .collect()
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn mkdir(path: &Path) -> Result<()> {
    io(path, std::fs::create_dir_all(path))
}

fn write(path: &Path, content: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        mkdir(parent)?;
    }
    io(path, std::fs::write(path, content))
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => io(path, Err(e)),
        _ => Ok(()),
    }
}

/// Creates `link` pointing at `target` with a relative path, as sysfs does.
fn symlink(target: &Path, link: &Path) -> Result<()> {
    if let Some(parent) = link.parent() {
        mkdir(parent)?;
    }
    let rel = relative(link.parent().unwrap_or(Path::new("")), target);
    remove(link)?;
    io(link, std::os::unix::fs::symlink(rel, link))
}

/// The relative path from directory `from` to `to` (both absolute or both
/// relative to the same base).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let f: Vec<Component<'_>> = from.components().collect();
    let t: Vec<Component<'_>> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative(Path::new("/a/b/c"), Path::new("/a/d")),
            PathBuf::from("../../d")
        );
        assert_eq!(
            relative(Path::new("/a"), Path::new("/a/b")),
            PathBuf::from("b")
        );
    }

    #[test]
    fn built_tree_looks_like_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let node = FakeNode::build(dir.path(), &NodeSpec::starlingx_edge()).unwrap();
        let sys = node.sysfs_root();
        let card1 = std::fs::canonicalize(sys.join("class/drm/card1/device")).unwrap();
        assert!(
            card1.ends_with("pci0000:00/0000:4a:01.0/0000:4b:00.0/0000:4c:01.0/0000:4d:00.0"),
            "{}",
            card1.display()
        );
        assert_eq!(
            std::fs::read_to_string(card1.join("sriov_numvfs")).unwrap(),
            "4\n"
        );
        let vf = std::fs::canonicalize(card1.join("virtfn3")).unwrap();
        assert!(vf.ends_with("0000:4d:00.4"));
        assert_eq!(std::fs::canonicalize(vf.join("physfn")).unwrap(), card1);
        assert!(sys.join("class/drm/card5").exists());
        assert!(sys.join("class/drm/card0-DP-1").exists());
        assert!(
            node.devfs_root()
                .join("dri/by-path/pci-0000:4d:00.0-render")
                .exists()
        );
        assert!(
            std::fs::read_link(
                node.devfs_root()
                    .join("dri/by-path/pci-0000:4d:00.0-render")
            )
            .unwrap()
                == Path::new("../renderD129")
        );
    }

    #[test]
    fn plug_and_unplug_follow_the_kernels_order() {
        let dir = tempfile::tempdir().unwrap();
        let node = FakeNode::create(dir.path()).unwrap();
        let spec = GpuSpec::new(1).at("0000:09:00.0");
        let root = dir.path().to_owned();
        let mut seen = Vec::new();
        node.plug_gpu(&spec, |e| {
            // At the announcement: sysfs and nodes exist, links do not yet.
            assert!(root.join("dev/dri/card1").exists());
            assert!(root.join("sys/class/drm/card1").exists());
            assert!(!root.join("dev/dri/by-path/pci-0000:09:00.0-card").exists());
            seen.push((e.action, e.devpath.clone()));
        })
        .unwrap();
        assert!(root.join("dev/dri/by-path/pci-0000:09:00.0-card").exists());
        assert_eq!(
            seen,
            // The kernel's order (drm_drv.c `drm_dev_register`): render
            // first, so the card's uevent finds both nodes.
            [
                (
                    "add",
                    "/devices/pci0000:00/0000:09:00.0/drm/renderD129".to_owned()
                ),
                (
                    "add",
                    "/devices/pci0000:00/0000:09:00.0/drm/card1".to_owned()
                ),
            ]
        );
        let mut seen = Vec::new();
        node.unplug_gpu(1, |e| {
            // At the announcement: nodes gone, sysfs and links still there.
            assert!(!root.join("dev/dri/card1").exists());
            assert!(root.join("sys/devices/pci0000:00/0000:09:00.0").exists());
            assert!(
                root.join("dev/dri/by-path/pci-0000:09:00.0-card")
                    .symlink_metadata()
                    .is_ok()
            );
            seen.push(e.to_kernel_message());
        })
        .unwrap();
        assert_eq!(seen.len(), 2);
        // `drm_dev_unregister`: the primary minor first.
        assert!(
            seen[0]
                .starts_with(b"remove@/devices/pci0000:00/0000:09:00.0/drm/card1\0ACTION=remove\0")
        );
        assert!(seen[1].starts_with(b"remove@/devices/pci0000:00/0000:09:00.0/drm/renderD129\0"));
        assert!(!root.join("sys/devices/pci0000:00/0000:09:00.0").exists());
        assert!(
            root.join("dev/dri/by-path/pci-0000:09:00.0-card")
                .symlink_metadata()
                .is_err()
        );
        assert!(root.join("sys/class/drm/card1").symlink_metadata().is_err());
    }

    #[test]
    fn remove_gpu_takes_its_vfs_and_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let node = FakeNode::build(dir.path(), &NodeSpec::starlingx_edge()).unwrap();
        node.remove_gpu(1).unwrap();
        let class = list(&node.sysfs_root().join("class/drm"));
        let mut class: Vec<&str> = class.iter().map(String::as_str).collect();
        class.sort_unstable();
        assert_eq!(
            class,
            [
                "card0",
                "card0-DP-1",
                "card0-HDMI-A-1",
                "renderD128",
                "version"
            ]
        );
        let mut dri = list(&node.devfs_root().join("dri"));
        dri.sort();
        assert_eq!(dri, ["by-path", "card0", "renderD128"]);
        assert!(matches!(
            node.remove_gpu(1),
            Err(FakeNodeError::NoSuchCard(1))
        ));
        node.add_gpu(&NodeSpec::starlingx_edge().gpus[1]).unwrap();
        assert!(node.sysfs_root().join("class/drm/card5").exists());
    }
}
