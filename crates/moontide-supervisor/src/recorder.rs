//! The flight recorder: what each thread of the node was running, readable after the node
//! died.
//!
//! A small file in the data dir, mapped shared by the node (the supervisor's child). Each
//! thread that runs tenant Lua owns one slot and, around every resume of a Lua call,
//! writes which function version it runs ([`running`]); a handler for the fatal signals
//! (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) writes which slot's thread took the signal,
//! then lets the signal kill the process as it would have. The supervisor reads the file
//! after the child's death ([`read_crash`]) — a dead process's shared mapping is still in
//! the file, and nothing else writes it then.
//!
//! Cost on the request path: a thread-local read, a compare of the slot's name words, and
//! two relaxed atomic stores per resume (the name is rewritten only when the thread
//! switches functions). Every cell is an
//! `AtomicU64`, so the supervisor reading while a child is still dying never races.
//!
//! This module and the signal handler are the crate's `unsafe` code; the invariants:
//! - the mapping lives for the rest of the process once installed (a `static`), so the
//!   handler's and the request path's pointers never dangle;
//! - the handler only reads a `const`-initialised thread-local (no lazy initialisation, no
//!   destructor), stores to atomics, and calls `raise`: all async-signal-safe.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The file's name in the data dir.
pub const FILE_NAME: &str = "flight-recorder";
/// Threads that can record (workers, the long-call worker, the admin thread; more are
/// simply not recorded).
pub const SLOTS: usize = 64;
const HEADER_WORDS: usize = 8;
const SLOT_WORDS: usize = 32;
/// Bytes of a function name kept (names are validated shorter).
const NAME_WORDS: usize = SLOT_WORDS - 3;
const FILE_WORDS: usize = HEADER_WORDS + SLOTS * SLOT_WORDS;
const MAGIC: u64 = 0x4d54_4652_4543_0001; // "MTFREC" v1

// Header words.
const H_MAGIC: usize = 0;
/// Slot index + 1 of the thread that took a fatal signal (0: none; `u64::MAX`: a thread
/// without a slot).
const H_CRASHED_SLOT: usize = 1;
const H_SIGNAL: usize = 2;

// Slot words.
const S_STATE: usize = 0;
const S_VERSION: usize = 1;
const S_NAME_LEN: usize = 2;
const S_NAME: usize = 3;

const IDLE: u64 = 0;
const RUNNING: u64 = 1;

struct Recorder {
    map: memmap2::MmapMut,
    next_slot: AtomicUsize,
}

impl Recorder {
    fn words(&self) -> &[AtomicU64] {
        let pointer = self.map.as_ptr().cast::<AtomicU64>();
        // SAFETY: the mapping is FILE_WORDS * 8 bytes (checked when mapped), page-aligned
        // (so 8-aligned), and lives as long as `self`; it is only ever accessed through
        // these atomics, in this process and (after the process died) by the supervisor.
        unsafe { std::slice::from_raw_parts(pointer, FILE_WORDS) }
    }

    fn slot(&self, index: usize) -> &[AtomicU64] {
        let start = HEADER_WORDS + index * SLOT_WORDS;
        &self.words()[start..start + SLOT_WORDS]
    }
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();

thread_local! {
    /// This thread's slot (`usize::MAX`: none claimed yet, or none left).
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Creates (or resets) the recorder file for a new child: zeroed, with its magic.
pub fn reset(data_dir: &Path) -> io::Result<()> {
    let mut bytes = vec![0u8; FILE_WORDS * 8];
    bytes[..8].copy_from_slice(&MAGIC.to_ne_bytes());
    std::fs::write(data_dir.join(FILE_NAME), bytes)
}

/// Maps the recorder file and installs the fatal-signal handler. Called once by the node
/// at start, when it runs under the supervisor; without it, [`running`] does nothing.
pub fn install(data_dir: &Path) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(data_dir.join(FILE_NAME))?;
    if file.metadata()?.len() != (FILE_WORDS * 8) as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the flight recorder file has the wrong size",
        ));
    }
    // SAFETY: the file is this node's own (the supervisor writes it only before the child
    // starts and reads it only after the child died); it is accessed only as atomics.
    let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
    let recorder = Recorder {
        map,
        next_slot: AtomicUsize::new(0),
    };
    if recorder.words()[H_MAGIC].load(Ordering::Relaxed) != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the flight recorder file has no magic",
        ));
    }
    if RECORDER.set(recorder).is_err() {
        return Ok(());
    }
    install_signal_handlers()
}

/// Marks this thread as running `function` `version` until the guard drops. Call around
/// each resume of tenant Lua (the init phase included).
#[inline]
pub fn running(function: &str, version: u64) -> Running {
    let Some(recorder) = RECORDER.get() else {
        return Running { slot: None };
    };
    let index = SLOT.with(|slot| {
        if slot.get() == usize::MAX {
            let claimed = recorder.next_slot.fetch_add(1, Ordering::Relaxed);
            if claimed < SLOTS {
                slot.set(claimed);
            }
        }
        slot.get()
    });
    if index >= SLOTS {
        return Running { slot: None };
    }
    let slot = recorder.slot(index);
    if !names(slot, function, version) {
        write_name(slot, function, version);
    }
    slot[S_STATE].store(RUNNING, Ordering::Relaxed);
    Running { slot: Some(slot) }
}

/// `true` if `slot` already names `function` `version`.
fn names(slot: &[AtomicU64], function: &str, version: u64) -> bool {
    let bytes = function.as_bytes();
    let kept = bytes.len().min(NAME_WORDS * 8);
    if slot[S_VERSION].load(Ordering::Relaxed) != version
        || slot[S_NAME_LEN].load(Ordering::Relaxed) != kept as u64
    {
        return false;
    }
    bytes[..kept].chunks(8).enumerate().all(|(index, chunk)| {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        slot[S_NAME + index].load(Ordering::Relaxed) == u64::from_ne_bytes(word)
    })
}

fn write_name(slot: &[AtomicU64], function: &str, version: u64) {
    let bytes = function.as_bytes();
    let kept = bytes.len().min(NAME_WORDS * 8);
    for (index, chunk) in bytes[..kept].chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        slot[S_NAME + index].store(u64::from_ne_bytes(word), Ordering::Relaxed);
    }
    slot[S_NAME_LEN].store(kept as u64, Ordering::Relaxed);
    slot[S_VERSION].store(version, Ordering::Relaxed);
}

/// While alive, this thread's slot says it runs tenant Lua.
#[must_use]
pub struct Running {
    slot: Option<&'static [AtomicU64]>,
}

impl Drop for Running {
    #[inline]
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            slot[S_STATE].store(IDLE, Ordering::Relaxed);
        }
    }
}

/// What the recorder says about a child that died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Culprit {
    /// The thread that took the fatal signal was running this function version's Lua.
    Function { name: String, version: u64 },
    /// The thread that took the signal was not running tenant Lua (host code).
    Host,
    /// No fatal-signal handler ran (e.g. SIGKILL): nobody is blamed.
    Unknown,
}

/// Reads the recorder file after the child died.
pub fn read_crash(data_dir: &Path) -> io::Result<Culprit> {
    let bytes = std::fs::read(data_dir.join(FILE_NAME))?;
    if bytes.len() != FILE_WORDS * 8 {
        return Ok(Culprit::Unknown);
    }
    let word = |index: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[index * 8..index * 8 + 8]);
        u64::from_ne_bytes(raw)
    };
    let crashed = word(H_CRASHED_SLOT);
    if crashed == 0 {
        return Ok(Culprit::Unknown);
    }
    let index = crashed as usize - 1;
    if index >= SLOTS {
        return Ok(Culprit::Host);
    }
    let base = HEADER_WORDS + index * SLOT_WORDS;
    if word(base + S_STATE) != RUNNING {
        return Ok(Culprit::Host);
    }
    let length = (word(base + S_NAME_LEN) as usize).min(NAME_WORDS * 8);
    let mut name = Vec::with_capacity(length);
    for index in 0..length.div_ceil(8) {
        name.extend_from_slice(&word(base + S_NAME + index).to_ne_bytes());
    }
    name.truncate(length);
    Ok(Culprit::Function {
        name: String::from_utf8_lossy(&name).into_owned(),
        version: word(base + S_VERSION),
    })
}

/// The signal a dead child took, as recorded by its handler (0: none recorded).
pub fn recorded_signal(data_dir: &Path) -> io::Result<i32> {
    let bytes = std::fs::read(data_dir.join(FILE_NAME))?;
    if bytes.len() != FILE_WORDS * 8 {
        return Ok(0);
    }
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[H_SIGNAL * 8..H_SIGNAL * 8 + 8]);
    Ok(u64::from_ne_bytes(raw) as i32)
}

const FATAL_SIGNALS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
];

extern "C" fn on_fatal_signal(signal: libc::c_int) {
    if let Some(recorder) = RECORDER.get() {
        let slot = SLOT.with(|slot| slot.get());
        let crashed = if slot < SLOTS {
            slot as u64 + 1
        } else {
            u64::MAX
        };
        let header = recorder.words();
        header[H_SIGNAL].store(signal as u64, Ordering::SeqCst);
        header[H_CRASHED_SLOT].store(crashed, Ordering::SeqCst);
    }
    // The handler was reset to the default on entry (SA_RESETHAND) and this signal is
    // blocked until we return: raising it again kills the process by it on return, as if
    // no handler had run (for a fault, re-running the instruction would too).
    // SAFETY: `raise` is async-signal-safe.
    unsafe {
        libc::raise(signal);
    }
}

fn install_signal_handlers() -> io::Result<()> {
    for signal in FATAL_SIGNALS {
        // SAFETY: a zeroed `sigaction` is a valid value to fill in; the handler only does
        // async-signal-safe work (module doc). SA_ONSTACK runs it on the alternate stack
        // the Rust runtime gives every thread, so a stack overflow is recorded too.
        let result = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fatal_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_ONSTACK | libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
