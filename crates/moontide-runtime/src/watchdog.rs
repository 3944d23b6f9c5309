//! Arms Luau's interrupt only when a running call has something for it to do.
//!
//! With an interrupt callback installed, Luau calls it at every safepoint (loop back-edge,
//! call, return); through mlua that costs a protected Rust call each time, measured at
//! +73% on a tight numeric loop (`bench/cpu_cost.sh`). Without one, the safepoint is a
//! null check. So the callback is installed once per state and then switched off: the
//! pointer in the state's `lua_Callbacks` is cleared, and this module's watchdog — run on
//! the clock's ticker thread every millisecond — writes it back only for a call whose next
//! event is due (the end of its timeslice or its deadline, whichever comes first). The
//! callback switches itself off again when it has done its work, unless the deadline has
//! passed (then every later safepoint must raise again, so a `pcall` cannot swallow it).
//!
//! Luau documents the interrupt as safe to set from an arbitrary thread (`lua.h`, on
//! `lua_Callbacks`: "interrupt is safe to set from an arbitrary thread"); the VM reads
//! the pointer afresh at each safepoint. This is the pattern of Luau's own REPL (Ctrl-C
//! arms the interrupt from a signal handler) and of wasmtime's epoch interruption.
//!
//! This is the crate's only `unsafe` code. The invariants that make it sound:
//! - A [`InterruptSwitch`] points into the `global_State` of the Lua state it was made
//!   for. Only two parties write through it: the Lua thread itself (inside the interrupt,
//!   or at call start/end, while it holds the state) and the watchdog, which writes only
//!   while the switch is in the watch list, under the list's lock.
//! - A switch is in its thread's watch list only while a call runs ([`Watched`] guard);
//!   the watchdog writes through it only under that list's lock. The guard is created and
//!   dropped inside `Instance::run`, which holds `&mut Instance` (and so the `Lua`) for its
//!   whole life. The state cannot be freed while the watchdog may still write.
//! - Writes are whole, aligned pointer stores done atomically on the Rust side.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use mlua::ffi;
use parking_lot::Mutex;

/// Turns one Lua state's interrupt callback on and off.
#[derive(Debug)]
pub(crate) struct InterruptSwitch {
    /// `&(*lua_callbacks(L)).interrupt`, as an atomic pointer cell.
    slot: *const AtomicPtr<()>,
    /// The function to write into the slot to arm it (mlua's trampoline to our callback).
    handler: *mut (),
    /// Coarse-clock millisecond at which the watchdog arms the interrupt (`u64::MAX`:
    /// never). Written by the Lua thread, read by the watchdog.
    arm_at_ms: AtomicU64,
}

// SAFETY: the raw pointers are only dereferenced under the invariants in the module doc:
// the slot is a pointer-sized atomic cell that lives as long as the Lua state, and the
// watchdog touches it only while the owning call keeps the state alive.
unsafe impl Send for InterruptSwitch {}
// SAFETY: as above; every access to the slot is an atomic operation.
unsafe impl Sync for InterruptSwitch {}

impl InterruptSwitch {
    /// Installs `callback` as `lua`'s interrupt, then switches it off. The callback runs
    /// only after [`InterruptSwitch::arm`] (from the watchdog or the Lua thread).
    pub fn install<F>(lua: &mlua::Lua, callback: F) -> mlua::Result<InterruptSwitch>
    where
        F: Fn(&mlua::Lua) -> mlua::Result<mlua::VmState> + 'static,
    {
        lua.set_interrupt(callback);
        let mut callbacks: *mut ffi::lua_Callbacks = std::ptr::null_mut();
        // SAFETY: `exec_raw` hands us a valid state of `lua` for the duration of the
        // closure; `lua_callbacks` returns the state's (global, shared by all its threads)
        // callback table, which lives as long as the state. We only read its address.
        unsafe {
            lua.exec_raw::<()>((), |state| callbacks = ffi::lua_callbacks(state))?;
        }
        // SAFETY: `callbacks` is valid (above); `interrupt` is an `Option<fn>`, which has
        // the layout of a nullable pointer, so viewing it as an `AtomicPtr<()>` is sound
        // (same size and alignment as `*mut ()`).
        let slot = unsafe {
            let field = std::ptr::addr_of_mut!((*callbacks).interrupt).cast::<*mut ()>();
            AtomicPtr::from_ptr(field) as *const AtomicPtr<()>
        };
        // SAFETY: `slot` is valid (above). mlua just stored its trampoline there.
        let handler = unsafe { (*slot).swap(std::ptr::null_mut(), Ordering::SeqCst) };
        if handler.is_null() {
            return Err(mlua::Error::runtime(
                "installing the interrupt: no interrupt function was set",
            ));
        }
        Ok(InterruptSwitch {
            slot,
            handler,
            arm_at_ms: AtomicU64::new(u64::MAX),
        })
    }

    /// Makes the next safepoint call the interrupt.
    pub fn arm(&self) {
        // SAFETY: see the module doc — the slot outlives every caller of `arm`.
        unsafe { (*self.slot).store(self.handler, Ordering::Release) }
    }

    /// Makes safepoints free again.
    pub fn disarm(&self) {
        // SAFETY: as in `arm`.
        unsafe { (*self.slot).store(std::ptr::null_mut(), Ordering::Release) }
    }

    /// `true` if the next safepoint calls the interrupt.
    #[cfg(test)]
    pub fn is_armed(&self) -> bool {
        // SAFETY: as in `arm`.
        unsafe { !(*self.slot).load(Ordering::Acquire).is_null() }
    }

    /// Schedules the watchdog to arm the interrupt at `at_ms` (coarse clock).
    pub fn arm_at(&self, at_ms: u64) {
        self.arm_at_ms.store(at_ms, Ordering::Release);
    }
}

/// The switches of one thread's calls in flight. Its lock is taken by that thread (twice
/// per call) and by the clock thread (once per tick) — never by another worker, so the
/// request path shares no lock between workers.
#[derive(Default)]
struct ThreadWatch {
    switches: Mutex<Vec<Arc<InterruptSwitch>>>,
}

/// Every thread that has run a call, registered once per thread; scanned each tick.
static THREADS: Mutex<Vec<Weak<ThreadWatch>>> = Mutex::new(Vec::new());

thread_local! {
    static THIS_THREAD: Arc<ThreadWatch> = {
        let watch = Arc::new(ThreadWatch::default());
        THREADS.lock().push(Arc::downgrade(&watch));
        watch
    };
}

/// Keeps a switch in its thread's watch list for the life of one call; on drop, removes
/// it and switches the interrupt off (after this, nothing but the Lua thread touches the
/// slot).
pub(crate) struct Watched {
    switch: Arc<InterruptSwitch>,
    list: Arc<ThreadWatch>,
}

impl Watched {
    pub fn start(switch: &Arc<InterruptSwitch>) -> Watched {
        let list = THIS_THREAD.with(Arc::clone);
        list.switches.lock().push(switch.clone());
        Watched {
            switch: switch.clone(),
            list,
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        {
            let mut switches = self.list.switches.lock();
            if let Some(at) = switches.iter().position(|s| Arc::ptr_eq(s, &self.switch)) {
                switches.swap_remove(at);
            }
        }
        self.switch.disarm();
        self.switch.arm_at(u64::MAX);
    }
}

/// One watchdog pass: arms every watched call whose next event is due. Called by the
/// clock's ticker after each tick.
pub(crate) fn tick(now_ms: u64) {
    let mut threads = THREADS.lock();
    threads.retain(|thread| {
        let Some(watch) = thread.upgrade() else {
            return false;
        };
        for switch in watch.switches.lock().iter() {
            if switch.arm_at_ms.load(Ordering::Acquire) <= now_ms {
                switch.arm();
            }
        }
        true
    });
}

/// `true` if `thread` (the coroutine running now) can yield at this point: Luau's
/// `lua_isyieldable`, false inside a C call (a `table.sort` comparator, a metamethod).
/// mlua makes the same check before it yields from the interrupt; asking first lets the
/// interrupt mark only yields that really happen (`preempt`).
pub(crate) fn is_yieldable(thread: &mlua::Thread) -> bool {
    let state = thread.to_pointer() as *mut ffi::lua_State;
    // SAFETY: `thread` is a live reference to a Lua thread, so `state` is its valid
    // `lua_State`; `lua_isyieldable` only reads two counters of it, on the thread that owns
    // the state (the interrupt runs on the Lua thread itself).
    !state.is_null() && unsafe { ffi::lua_isyieldable(state) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_turns_the_callback_on_and_off() {
        let lua = mlua::Lua::new();
        let calls = std::rc::Rc::new(std::cell::Cell::new(0u32));
        let counted = calls.clone();
        let switch = InterruptSwitch::install(&lua, move |_| {
            counted.set(counted.get() + 1);
            Ok(mlua::VmState::Continue)
        })
        .unwrap();
        let spin = lua
            .load("local s = 0 for i = 1, 1000 do s = s + i end return s")
            .into_function()
            .unwrap();
        spin.call::<i64>(()).unwrap();
        assert_eq!(calls.get(), 0, "switched off after install");
        switch.arm();
        assert!(switch.is_armed());
        spin.call::<i64>(()).unwrap();
        assert!(calls.get() >= 1000, "armed: called at every back-edge");
        switch.disarm();
        let before = calls.get();
        spin.call::<i64>(()).unwrap();
        assert_eq!(calls.get(), before, "switched off again");
    }

    #[test]
    fn the_watchdog_arms_only_due_switches_while_watched() {
        let lua = mlua::Lua::new();
        let switch =
            Arc::new(InterruptSwitch::install(&lua, |_| Ok(mlua::VmState::Continue)).unwrap());
        switch.arm_at(100);
        tick(1_000);
        assert!(!switch.is_armed(), "not watched: never armed");
        let watched = Watched::start(&switch);
        tick(99);
        assert!(!switch.is_armed(), "not due yet");
        tick(100);
        assert!(switch.is_armed(), "due: armed");
        drop(watched);
        assert!(!switch.is_armed(), "the end of the call disarms");
        tick(1_000);
        assert!(!switch.is_armed(), "no longer watched");
    }
}
