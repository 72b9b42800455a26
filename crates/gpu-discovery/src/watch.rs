//! Following hotplug: every event source funnels into one rescan that reacts
//! at once to the first event of a burst and coalesces the rest. Events are
//! hints; sysfs is the truth.
//!
//! Sources: kernel uevents (netlink group 1, which reaches ordinary pods)
//! and udev's processed events (group 2, only in the host's network
//! namespace) on one netlink socket; inotify on `<devfs>/dri` and
//! `<devfs>/dri/by-path` (nodes and links appearing and vanishing, including
//! udev finishing the links after the kernel event); and a slow periodic
//! rescan as a safety net, faster when no event source could be opened.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dir_watch::{DirWatch, Mask};
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
    UnixCredentials, bind, recvmsg, setsockopt, socket, sockopt,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::DiscoveryConfig;
use crate::inventory::Inventory;
use crate::scan::{DiscoveryError, scan};
use crate::uevent;

/// Netlink multicast groups: the kernel's (1) and udev's (2).
const KERNEL_GROUP: u32 = 1;
const UDEV_GROUP: u32 = 2;

/// How the watcher behaves.
#[derive(Debug, Clone)]
pub struct WatcherConfig {
    discovery: DiscoveryConfig,
    rescan: Duration,
    fallback_rescan: Duration,
    settle: Duration,
    uevents: bool,
    inotify: bool,
    trusted_port: Option<u32>,
    #[cfg(feature = "libudev")]
    libudev: bool,
}

impl WatcherConfig {
    /// Watches the node `discovery` reads: uevents and inotify on, a
    /// safety rescan every 60 s (every 5 s when no event source opened),
    /// bursts coalesced over 20 ms.
    #[must_use]
    pub fn new(discovery: DiscoveryConfig) -> Self {
        Self {
            discovery,
            rescan: Duration::from_secs(60),
            fallback_rescan: Duration::from_secs(5),
            settle: Duration::from_millis(20),
            trusted_port: None,
            uevents: true,
            inotify: true,
            #[cfg(feature = "libudev")]
            libudev: false,
        }
    }

    /// Adds a libudev monitor (DRM and PCI events after udev processed
    /// them) as a source. Needs the `libudev` feature and the host's udev
    /// in the same network namespace.
    #[cfg(feature = "libudev")]
    #[must_use]
    pub fn with_libudev(mut self) -> Self {
        self.libudev = true;
        self
    }

    /// The safety rescan interval while event sources work.
    #[must_use]
    pub fn rescan_every(mut self, every: Duration) -> Self {
        self.rescan = every;
        self
    }

    /// The rescan interval when no event source could be opened.
    #[must_use]
    pub fn fallback_rescan_every(mut self, every: Duration) -> Self {
        self.fallback_rescan = every;
        self
    }

    /// How long after the last event of a burst the trailing rescan waits.
    #[must_use]
    pub fn settle(mut self, wait: Duration) -> Self {
        self.settle = wait;
        self
    }

    /// Does not open the netlink uevent socket.
    #[must_use]
    pub fn without_uevents(mut self) -> Self {
        self.uevents = false;
        self
    }

    /// Does not watch devfs with inotify.
    #[must_use]
    pub fn without_inotify(mut self) -> Self {
        self.inotify = false;
        self
    }

    /// Also takes kernel-format uevents sent from netlink port `port` as
    /// the kernel's: for a test kernel (`fake_gpu_node::inject_uevent`
    /// sends from `fake_gpu_node::FAKE_KERNEL_PORT` in a hermetic
    /// namespace), since no process can send from the kernel's port 0.
    /// Never set it on a real node: whoever binds that port could then
    /// take GPUs out with a forged `remove` or `WEDGED=`.
    #[must_use]
    pub fn trust_uevent_port(mut self, port: u32) -> Self {
        self.trusted_port = Some(port);
        self
    }
}

/// Why a netlink message is not taken as a uevent from its real sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Kernel-format, but not from the kernel's port 0.
    NotTheKernel,
    /// udev-format, but not from a root process on group 2.
    NotUdev,
    /// Sent to no group or to a group neither uses (unicast).
    Unicast,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotTheKernel => "a kernel uevent not sent by the kernel (netlink port is not 0)",
            Self::NotUdev => "a udev uevent not sent by root to udev's group",
            Self::Unicast => "a netlink message sent to no uevent group",
        })
    }
}

/// Whether a message is from its real sender, as libudev decides
/// (systemd `src/libsystemd/sd-device/device-monitor.c`,
/// `device_monitor_receive_device`: kernel-group messages only from port
/// 0, udev-group messages only with root credentials, unicast ignored).
/// `groups` is the group mask the message was sent to, `port` the
/// sender's netlink port, `uid` its `SCM_CREDENTIALS` uid; `kernel_format`
/// whether it is `ACTION@DEVPATH` (not udev's `libudev` header).
pub(crate) fn check_sender(
    groups: u32,
    port: u32,
    uid: Option<u32>,
    kernel_format: bool,
    trusted_port: Option<u32>,
) -> Result<(), Refused> {
    let kernel_group = groups & KERNEL_GROUP != 0;
    let udev_group = groups & UDEV_GROUP != 0;
    if kernel_format && kernel_group {
        return if port == 0 || Some(port) == trusted_port {
            Ok(())
        } else {
            Err(Refused::NotTheKernel)
        };
    }
    if !kernel_format && udev_group {
        return if port != 0 && uid == Some(0) {
            Ok(())
        } else {
            Err(Refused::NotUdev)
        };
    }
    Err(match (groups, kernel_format) {
        (0, _) => Refused::Unicast,
        (_, true) => Refused::NotTheKernel,
        (_, false) => Refused::NotUdev,
    })
}

/// An event source and whether it opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Netlink uevents (kernel, and udev where visible).
    Uevents,
    /// inotify on the devfs `dri` directories.
    DevfsInotify,
    /// A libudev monitor (feature `libudev`).
    #[cfg(feature = "libudev")]
    Libudev,
}

/// Follows the inventory; the latest differing inventory is published on a
/// `watch` channel (consumers never block the watcher, latest wins).
#[derive(Debug)]
pub struct InventoryWatcher {
    rx: watch::Receiver<Arc<Inventory>>,
    sources: Vec<Source>,
    rescans: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    running: Arc<ScanClock>,
    /// The rescan loop and every event source: dropping the watcher ends
    /// them all.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for InventoryWatcher {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl InventoryWatcher {
    /// Scans once and starts following. Must be called inside a tokio
    /// runtime. Sources that cannot be opened are logged once and left out.
    ///
    /// # Errors
    /// When the first scan fails (see [`scan`]).
    pub fn spawn(config: WatcherConfig) -> Result<Self, DiscoveryError> {
        // Sources are opened and armed before the first scan, so a change
        // between the two is never missed.
        let (hint_tx, hint_rx) = mpsc::channel(64);
        let notes = Arc::new(KernelNotes::default());
        let refused = Arc::new(AtomicU64::new(0));
        let mut sources = Vec::new();
        let mut tasks = Vec::new();
        if config.uevents {
            match open_uevents() {
                Ok(fd) => {
                    tasks.push(tokio::spawn(uevent_source(
                        fd,
                        hint_tx.clone(),
                        Arc::clone(&notes),
                        UeventTrust {
                            port: config.trusted_port,
                            refused: Arc::clone(&refused),
                        },
                    )));
                    sources.push(Source::Uevents);
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot receive uevents; hotplug falls back to other sources")
                }
            }
        }
        if config.inotify {
            match DirWatch::new() {
                Ok(w) => {
                    let devfs = DevfsWatch::armed(w, config.discovery.devfs_root());
                    tasks.push(tokio::spawn(devfs_source(devfs, hint_tx.clone())));
                    sources.push(Source::DevfsInotify);
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot watch devfs; hotplug falls back to other sources")
                }
            }
        }
        #[cfg(feature = "libudev")]
        if config.libudev {
            match spawn_libudev(hint_tx.clone()) {
                Ok(()) => sources.push(Source::Libudev),
                Err(error) => {
                    tracing::warn!(%error, "cannot open a libudev monitor; hotplug falls back to other sources")
                }
            }
        }
        drop(hint_tx);
        let first = scan(&config.discovery)?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let interval = if sources.is_empty() {
            tracing::warn!(every = ?config.fallback_rescan, "no hotplug event source could be opened; rescanning periodically");
            config.fallback_rescan
        } else {
            config.rescan
        };
        let rescans = Arc::new(AtomicU64::new(0));
        let timing = Timing {
            interval,
            settle: config.settle,
        };
        let discovery = config.discovery.clone();
        let counter = Arc::clone(&rescans);
        let running = Arc::new(ScanClock::default());
        let clock = Arc::clone(&running);
        let tx = Arc::new(tx);
        let rescan = move || {
            counter.fetch_add(1, Ordering::Relaxed);
            let d = discovery.clone();
            let tx = Arc::clone(&tx);
            let notes = Arc::clone(&notes);
            let clock = Arc::clone(&clock);
            async move {
                clock.start();
                let scanned = tokio::task::spawn_blocking(move || scan(&d)).await;
                clock.stop();
                match scanned {
                    Ok(Ok(mut inv)) => {
                        notes.apply(&mut inv);
                        tx.send_if_modified(|cur| {
                            if **cur == inv {
                                false
                            } else {
                                tracing::info!(
                                    gpus = inv.gpus.len(),
                                    advertised = inv.advertised().count(),
                                    "inventory changed"
                                );
                                *cur = Arc::new(inv);
                                true
                            }
                        });
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "rescan failed; keeping the last inventory")
                    }
                    Err(error) => {
                        tracing::warn!(%error, "rescan task failed; keeping the last inventory")
                    }
                }
            }
        };
        tasks.push(tokio::spawn(drive(hint_rx, timing, rescan)));
        Ok(Self {
            rx,
            sources,
            rescans,
            refused,
            running,
            tasks,
        })
    }

    /// A receiver of inventories (the current one is marked seen).
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Arc<Inventory>> {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        rx
    }

    /// The current inventory.
    #[must_use]
    pub fn current(&self) -> Arc<Inventory> {
        Arc::clone(&self.rx.borrow())
    }

    /// The event sources that opened.
    #[must_use]
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// How long the rescan in progress has been running, if one is: a scan
    /// stuck in a sysfs read (a GPU in reset) shows here, for a watchdog.
    #[must_use]
    pub fn scan_running_for(&self) -> Option<Duration> {
        self.running.running_for()
    }

    /// Netlink messages refused since the start because they did not come
    /// from their real sender (a forged uevent: see
    /// [`WatcherConfig::trust_uevent_port`]).
    #[must_use]
    pub fn refused_uevents(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Rescans done since the start (not counting the first scan).
    #[must_use]
    pub fn rescans(&self) -> u64 {
        self.rescans.load(Ordering::Relaxed)
    }
}

/// When the rescan in progress started (0: none runs).
#[derive(Debug)]
struct ScanClock {
    epoch: std::time::Instant,
    started_ms: AtomicU64,
}

impl Default for ScanClock {
    fn default() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            started_ms: AtomicU64::new(0),
        }
    }
}

impl ScanClock {
    fn now_ms(&self) -> u64 {
        // +1: 0 means "none runs".
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn start(&self) {
        self.started_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn stop(&self) {
        self.started_ms.store(0, Ordering::Relaxed);
    }

    fn running_for(&self) -> Option<Duration> {
        let started = self.started_ms.load(Ordering::Relaxed);
        (started != 0).then(|| Duration::from_millis(self.now_ms().saturating_sub(started)))
    }
}

/// A hint that something may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hint {
    /// Something may have changed: rescans coalesce.
    Changed,
    /// A DRM card was added or removed, or its health changed (its own
    /// uevent): rescan now, even in the middle of a burst.
    Card,
}

/// What the kernel's uevents said about cards, kept between scans and laid
/// over each one.
///
/// Removal: the kernel deletes the device node, sends `remove`, and only
/// then removes the sysfs directory. The uevent is authoritative for its
/// card, which is left out of every scan that still finds it in sysfs,
/// until sysfs agrees, an `add` arrives, or [`GONE_FOR_AT_MOST`] passes
/// (sysfs is the truth again).
///
/// Health: `WEDGED=<methods>` marks a card wedged, i915's `ERROR=1` /
/// `RESET=1` mark it resetting; `WEDGED=none`, `ERROR=0`, or the card's
/// removal or new `add` (a rebind, a bus reset) clear the mark.
#[derive(Debug, Default)]
pub(crate) struct KernelNotes(std::sync::Mutex<Notes>);

#[derive(Debug, Default)]
struct Notes {
    gone: std::collections::HashMap<String, Instant>,
    health: std::collections::HashMap<String, String>,
}

/// How long a `remove` uevent outweighs sysfs.
const GONE_FOR_AT_MOST: Duration = Duration::from_secs(10);

impl KernelNotes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Notes> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes what a card's uevent says; true when it said something.
    pub(crate) fn note(&self, event: &uevent::Uevent) -> bool {
        let Some(card) = event.drm_card() else {
            return false;
        };
        let mut notes = self.lock();
        match (&event.action, event.health_signal()) {
            (uevent::Action::Remove, _) => {
                notes.gone.insert(card.to_owned(), Instant::now());
                notes.health.remove(card);
            }
            (uevent::Action::Add, _) => {
                notes.gone.remove(card);
                notes.health.remove(card);
            }
            (_, Some(signal)) => {
                let why = match signal {
                    uevent::HealthSignal::Wedged(methods) => {
                        format!("{} (recovery: {methods})", crate::inventory::WEDGED)
                    }
                    uevent::HealthSignal::Error => "the driver reported a GPU hang".to_owned(),
                    uevent::HealthSignal::Resetting => "the driver is resetting it".to_owned(),
                    uevent::HealthSignal::Recovered => {
                        if notes.health.remove(card).is_some() {
                            tracing::info!(card, "the kernel reports the card recovered");
                        }
                        return true;
                    }
                };
                tracing::warn!(card, reason = %why, "kernel health event");
                notes.health.insert(card.to_owned(), why);
            }
            _ => return false,
        }
        true
    }

    /// Leaves out of `inventory` the cards removed by uevent, marks the
    /// ones with a health note, and forgets what sysfs has overtaken.
    pub(crate) fn apply(&self, inventory: &mut Inventory) {
        let mut notes = self.lock();
        if notes.gone.is_empty() && notes.health.is_empty() {
            return;
        }
        let present = |card: &str| inventory.gpus.iter().any(|g| g.card == card);
        notes
            .gone
            .retain(|card, since| since.elapsed() < GONE_FOR_AT_MOST && present(card));
        notes.health.retain(|card, _| present(card));
        let notes = &*notes;
        inventory.gpus.retain(|g| !notes.gone.contains_key(&g.card));
        for gpu in &mut inventory.gpus {
            gpu.kernel_health = notes.health.get(&gpu.card).cloned();
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) interval: Duration,
    pub(crate) settle: Duration,
}

/// The coalescing loop: the first hint of a burst rescans at once; hints
/// that arrive during that rescan or within `settle` of each other cause
/// one trailing rescan (bounded: a burst that never ends still rescans every
/// 10 × `settle`); a card's own add or remove ([`Hint::Card`]) rescans at
/// once, burst or not; without hints, a rescan every `interval`.
pub(crate) async fn drive<F, Fut>(mut hints: mpsc::Receiver<Hint>, timing: Timing, mut rescan: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut hints_open = true;
    let mut next_periodic = Instant::now() + timing.interval;
    loop {
        if hints_open {
            tokio::select! {
                h = hints.recv() => if h.is_none() { hints_open = false; continue },
                () = tokio::time::sleep_until(next_periodic) => {}
            }
        } else {
            tokio::time::sleep_until(next_periodic).await;
        }
        // The safety net counts from the latest rescan.
        next_periodic = Instant::now() + timing.interval;
        rescan().await;
        // Trailing edge: what arrived meanwhile, then quiet for `settle`;
        // a card's own event cuts the wait short.
        loop {
            let mut dirty = false;
            let mut urgent = false;
            while let Ok(h) = hints.try_recv() {
                dirty = true;
                urgent |= h == Hint::Card;
            }
            let burst_end = Instant::now() + timing.settle * 10;
            while hints_open && !urgent {
                let wait = (Instant::now() + timing.settle).min(burst_end);
                match tokio::time::timeout_at(wait, hints.recv()).await {
                    Ok(Some(h)) => {
                        dirty = true;
                        urgent = h == Hint::Card;
                    }
                    Ok(None) => hints_open = false,
                    Err(_) => break,
                }
                if Instant::now() >= burst_end {
                    break;
                }
            }
            if !dirty {
                break;
            }
            next_periodic = Instant::now() + timing.interval;
            rescan().await;
            if !urgent {
                break;
            }
        }
    }
}

/// Opens a netlink socket subscribed to kernel and udev uevents.
fn open_uevents() -> io::Result<AsyncFd<OwnedFd>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    bind(
        fd.as_raw_fd(),
        &NetlinkAddr::new(0, KERNEL_GROUP | UDEV_GROUP),
    )?;
    // The sender's credentials with each message, to tell udevd (root)
    // from anyone else on group 2.
    setsockopt(&fd, sockopt::PassCred, &true)?;
    // SAFETY: `fd` is an open socket owned by the `AsyncFd` for its whole
    // life; `OwnedFd::as_raw_fd` always returns that descriptor.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// Which senders the uevent source believes, and its count of the rest.
struct UeventTrust {
    port: Option<u32>,
    refused: Arc<AtomicU64>,
}

async fn uevent_source(
    fd: AsyncFd<OwnedFd>,
    hints: mpsc::Sender<Hint>,
    notes: Arc<KernelNotes>,
    trust: UeventTrust,
) {
    let mut buf = vec![0u8; uevent::MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!(UnixCredentials);
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        let received = guard.try_io(|inner| {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<NetlinkAddr>(
                inner.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            let uid = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|m| match m {
                    ControlMessageOwned::ScmCredentials(cred) => Some(cred.uid()),
                    _ => None,
                })
            });
            let (port, groups) = msg.address.map_or((u32::MAX, 0), |a| (a.pid(), a.groups()));
            Ok((msg.bytes, port, groups, uid))
        });
        match received {
            Ok(Ok((n, port, groups, uid))) => {
                let Some(bytes) = buf.get(..n) else { continue };
                // udev's messages start with its "libudev\0" header.
                let kernel_format = !bytes.starts_with(b"libudev\0");
                if let Err(why) = check_sender(groups, port, uid, kernel_format, trust.port) {
                    let count = trust.refused.fetch_add(1, Ordering::Relaxed) + 1;
                    // One line for the first, then one per thousand.
                    if count == 1 || count.is_multiple_of(1000) {
                        tracing::warn!(port, groups, ?uid, refused = count, reason = %why, "uevent refused: not from its real sender");
                    }
                    continue;
                }
                let hint = match uevent::parse(bytes) {
                    Ok(event) => {
                        tracing::debug!(origin = %event.origin, action = ?event.action, devpath = %event.devpath, "uevent");
                        // Only the kernel's own word takes a card out or
                        // marks it sick; udev's copy is a hint to rescan.
                        if event.origin == uevent::Origin::Kernel && notes.note(&event) {
                            Some(Hint::Card)
                        } else {
                            event.concerns_gpus().then_some(Hint::Changed)
                        }
                    }
                    // Unparsable: a hint all the same.
                    Err(_) => Some(Hint::Changed),
                };
                if let Some(hint) = hint
                    && hints.try_send(hint).is_err()
                    && hints.is_closed()
                {
                    return;
                }
            }
            // ENOBUFS: events were lost; a rescan recovers the truth.
            Ok(Err(_)) => {
                if hints.try_send(Hint::Changed).is_err() && hints.is_closed() {
                    return;
                }
            }
            Err(_would_block) => {}
        }
    }
}

/// libudev's handles may not cross threads: the monitor is opened and
/// lives on its own thread, which polls with a timeout so that it ends soon
/// after the watcher. Returns once the monitor opened (or failed to).
#[cfg(feature = "libudev")]
fn spawn_libudev(hints: mpsc::Sender<Hint>) -> io::Result<()> {
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("libudev-monitor".into())
        .spawn(move || {
            let socket = udev::MonitorBuilder::new()
                .and_then(|b| b.match_subsystem("drm")?.match_subsystem("pci")?.listen());
            match socket {
                Ok(socket) => {
                    let _ = opened_tx.send(Ok(()));
                    libudev_source(&socket, &hints);
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                }
            }
        })?;
    opened_rx
        .recv()
        .map_err(|_| io::Error::other("the libudev thread ended"))?
}

#[cfg(feature = "libudev")]
fn libudev_source(socket: &udev::MonitorSocket, hints: &mpsc::Sender<Hint>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    while !hints.is_closed() {
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(0) => {}
            Ok(_) => {
                if socket.iter().count() > 0 {
                    let _ = hints.try_send(Hint::Changed);
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(error) => {
                tracing::warn!(%error, "libudev monitor failed");
                return;
            }
        }
    }
}

/// inotify on `<devfs>`, `<devfs>/dri` and `<devfs>/dri/by-path`, re-armed
/// as they appear.
struct DevfsWatch {
    watch: DirWatch,
    devfs: PathBuf,
    watched: Vec<(PathBuf, dir_watch::WatchId)>,
}

impl DevfsWatch {
    const MASK: Mask = Mask::IN_CREATE
        .union(Mask::IN_DELETE)
        .union(Mask::IN_MOVED_TO)
        .union(Mask::IN_MOVED_FROM)
        .union(Mask::IN_ATTRIB)
        .union(Mask::IN_DELETE_SELF);

    /// Watches what exists now, synchronously.
    fn armed(watch: DirWatch, devfs: &std::path::Path) -> Self {
        let mut me = Self {
            watch,
            devfs: devfs.to_owned(),
            watched: Vec::new(),
        };
        me.arm();
        me
    }

    /// Watches each directory that exists and has no live watch. A watch
    /// the kernel dropped (IN_IGNORED, after IN_DELETE_SELF) is dead even
    /// when a directory of the same name is back: udev removes `/dev/dri`
    /// with the last DRM device and the kernel creates a new one later.
    fn arm(&mut self) {
        let watch = &self.watch;
        self.watched.retain(|(_, id)| watch.is_live(*id));
        let dri = self.devfs.join("dri");
        let by_path = dri.join("by-path");
        for dir in [self.devfs.clone(), dri, by_path] {
            let present = self.watched.iter().any(|(p, _)| *p == dir);
            if !present
                && dir.is_dir()
                && let Ok(id) = self.watch.add(&dir, Self::MASK)
            {
                tracing::debug!(dir = %dir.display(), "watching");
                self.watched.push((dir, id));
            }
        }
    }
}

/// Turns devfs events into hints, re-arming as directories appear.
async fn devfs_source(mut devfs: DevfsWatch, hints: mpsc::Sender<Hint>) {
    loop {
        match devfs.watch.next().await {
            Ok(events) => {
                let relevant = events.iter().any(|e| {
                    e.dir.as_deref() != Some(devfs.devfs.as_path()) || is_dri(e.name.as_deref())
                });
                devfs.arm();
                if relevant && hints.try_send(Hint::Changed).is_err() && hints.is_closed() {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "devfs watch failed");
                return;
            }
        }
    }
}

fn is_dri(name: Option<&std::ffi::OsStr>) -> bool {
    name.is_some_and(|n| n == "dri")
}

#[cfg(test)]
mod sender_tests {
    use super::{Refused, check_sender};

    #[test]
    fn uevents_are_taken_only_from_their_real_sender() {
        let k = true;
        for (groups, port, uid, kernel_format, trusted, want) in [
            (1, 0, Some(0), k, None, Ok(())),
            (1, 0, None, k, None, Ok(())),
            // A root process in the node's network namespace forging the
            // kernel: refused, unless it is the test kernel asked for.
            (1, 4242, Some(0), k, None, Err(Refused::NotTheKernel)),
            (1, 4242, Some(0), k, Some(4242), Ok(())),
            (1, 4243, Some(0), k, Some(4242), Err(Refused::NotTheKernel)),
            // udevd (root) on group 2; anyone else refused.
            (2, 977, Some(0), !k, None, Ok(())),
            (2, 977, Some(1000), !k, None, Err(Refused::NotUdev)),
            (2, 977, None, !k, None, Err(Refused::NotUdev)),
            (2, 0, Some(0), !k, None, Err(Refused::NotUdev)),
            // Formats on the other's group, and unicast.
            (2, 977, Some(0), k, None, Err(Refused::NotTheKernel)),
            (1, 0, Some(0), !k, None, Err(Refused::NotUdev)),
            (0, 0, Some(0), k, None, Err(Refused::Unicast)),
        ] {
            assert_eq!(
                check_sender(groups, port, uid, kernel_format, trusted),
                want,
                "groups {groups} port {port} uid {uid:?} kernel format {kernel_format}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    async fn run(hints_at: &[u64], total: u64) -> usize {
        let (tx, rx) = mpsc::channel(64);
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        let timing = Timing {
            interval: Duration::from_secs(60),
            settle: Duration::from_millis(20),
        };
        let task = tokio::spawn(drive(rx, timing, move || {
            c.fetch_add(1, Ordering::SeqCst);
            std::future::ready(())
        }));
        let start = Instant::now();
        for &at in hints_at {
            tokio::time::sleep_until(start + Duration::from_millis(at)).await;
            tx.send(Hint::Changed).await.unwrap();
        }
        tokio::time::sleep_until(start + Duration::from_millis(total)).await;
        task.abort();
        count.load(Ordering::SeqCst)
    }

    /// `/dev/dri` deleted and created again before the watcher looks: the
    /// old watch is dead although the path is a directory again, and only a
    /// new one sees what happens in the new directory.
    #[tokio::test]
    async fn a_dri_directory_replaced_behind_the_watchers_back_is_watched_anew() {
        let root = tempfile::tempdir().unwrap();
        let dri = root.path().join("dri");
        std::fs::create_dir_all(dri.join("by-path")).unwrap();
        let mut devfs = DevfsWatch::armed(DirWatch::new().unwrap(), root.path());
        std::fs::remove_dir_all(&dri).unwrap();
        std::fs::create_dir_all(dri.join("by-path")).unwrap();
        // Drain what the replacement queued, re-arming as the source does.
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(100), devfs.watch.next()).await
        {
            devfs.arm();
        }
        devfs.arm();
        std::fs::write(dri.join("card0"), "").unwrap();
        let events = tokio::time::timeout(Duration::from_secs(5), devfs.watch.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.name.as_deref() == Some(std::ffi::OsStr::new("card0"))),
            "{events:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_event_one_rescan() {
        assert_eq!(run(&[0], 1000).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_leading_and_one_trailing_rescan() {
        // A GPU add: PCI, card, render, connectors, MEI, hwmon within 15 ms.
        assert_eq!(run(&[0, 1, 2, 5, 9, 15], 1000).await, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn separate_events_rescan_separately() {
        assert_eq!(run(&[0, 500], 1000).await, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_burst_still_rescans() {
        let every_10ms: Vec<u64> = (0..100).map(|i| i * 10).collect();
        let n = run(&every_10ms, 1000).await;
        assert!((4..=12).contains(&n), "{n}");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_happening_rescans_at_the_interval_only() {
        assert_eq!(run(&[], 60_000 * 3 + 10).await, 3);
    }
}
