//! The backend abstraction: what `ipc` and `fusion` need from a device runtime.
//!
//! One static trait in the style of wgpu-hal. Backends check little (`debug_assert!`): a
//! precondition that fails is a bug in the caller (`fusion` validates user input before it
//! reaches this layer).

use crate::{KernelId, LaunchParams, Result};
use std::fmt;
use std::time::Duration;

/// Which runtime a backend drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Host memory and POSIX shared memory; the kernels in Rust.
    Cpu,
    /// NVIDIA, through the CUDA driver API.
    Cuda,
    /// AMD, through the HIP runtime.
    Hip,
}

impl BackendKind {
    /// Lower-case name, as used in features, environment variables and file names.
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Hip => "hip",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            "hip" => Ok(BackendKind::Hip),
            other => Err(format!("unknown backend {other:?} (expected cpu, cuda or hip)")),
        }
    }
}

/// An address in a backend's memory space (a device address, or a host address on the CPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevicePtr(pub u64);

impl DevicePtr {
    /// The address `bytes` further on.
    pub const fn add(self, bytes: usize) -> DevicePtr {
        DevicePtr(self.0 + bytes as u64)
    }
}

/// A device runtime: devices, streams, events, shareable memory, IPC handles and launches.
pub trait Backend: Sized + Send + Sync + 'static {
    /// Which runtime this is.
    const KIND: BackendKind;
    /// A device (context) that one rank drives. Cheap to clone (shared inside).
    type Device: Clone + Send + Sync;
    /// An ordered queue of work on a device.
    type Stream: Send;
    /// A point in a stream, for timing.
    type Event: Send;
    /// Memory that peers can map (a rank's shared buffer). Freed on drop.
    type SharedBuffer: Send + Sync;
    /// What a rank sends its peers so that they can map its shared buffer.
    type IpcHandle: bytemuck::Pod + Send + Sync;
    /// A peer's shared buffer, mapped into this rank. Unmapped on drop.
    type PeerMapping: Send + Sync;

    /// Number of devices visible to this process.
    fn device_count() -> Result<usize>;
    /// Opens device `ordinal` for a rank. `co_resident_ranks` is how many ranks of the group drive
    /// this same device at once (1 in production; more when ranks are simulated on one GPU): kernels
    /// that spin on peers must then use at most 1/`co_resident_ranks` of the device so that every
    /// rank's blocks are resident together.
    fn open_device(ordinal: usize, co_resident_ranks: usize) -> Result<Self::Device>;
    /// A short description of the device (name, architecture).
    fn describe(device: &Self::Device) -> String;
    /// Compiles and loads every kernel on `device` now. Called when an operator is created, before
    /// its ranks meet for the last time: loading a module can wait for the device to go idle, which
    /// never happens while a peer's kernel spins waiting for this rank.
    fn prepare(device: &Self::Device) -> Result<()> {
        let _ = device;
        Ok(())
    }
    /// Creates a stream on `device`.
    fn create_stream(device: &Self::Device) -> Result<Self::Stream>;

    /// Allocates `bytes` of zero-filled memory that peers can map.
    fn alloc_shared(device: &Self::Device, bytes: usize) -> Result<Self::SharedBuffer>;
    /// The address of a shared buffer in this rank's address space.
    fn shared_ptr(buffer: &Self::SharedBuffer) -> DevicePtr;
    /// The size of a shared buffer in bytes.
    fn shared_len(buffer: &Self::SharedBuffer) -> usize;
    /// Fills `bytes` of `buffer` from byte `offset` on with `pattern` (little-endian, repeated),
    /// through a stream of its own, finished on return (how a rank arms its push region before any
    /// peer maps it). A range outside the buffer, or not in whole 32-bit words, is
    /// [`crate::Error::OutOfRange`].
    fn fill_shared(
        device: &Self::Device,
        buffer: &Self::SharedBuffer,
        offset: usize,
        bytes: usize,
        pattern: u32,
    ) -> Result<()> {
        let len = Self::shared_len(buffer);
        if offset.checked_add(bytes).is_none_or(|end| end > len) || offset % 4 != 0 || bytes % 4 != 0 {
            return Err(crate::Error::OutOfRange { what: "fill_shared", offset, bytes, len });
        }
        let words: Vec<u8> = pattern.to_le_bytes().repeat(bytes / 4);
        let stream = Self::create_stream(device)?;
        // SAFETY: `offset..offset + bytes` lies inside `buffer` (checked above), which is live
        // device memory of this backend; the stream is synchronised before the buffer can go.
        unsafe { Self::write(&stream, Self::shared_ptr(buffer).add(offset), &words)? };
        Self::synchronize(&stream)
    }
    /// The handle peers use to map `buffer`.
    fn export_handle(buffer: &Self::SharedBuffer) -> Result<Self::IpcHandle>;
    /// Maps a peer's buffer from its handle (a peer in this process gets its pointer directly).
    fn open_handle(device: &Self::Device, handle: &Self::IpcHandle) -> Result<Self::PeerMapping>;
    /// The address of a peer's buffer in this rank's address space.
    fn peer_ptr(mapping: &Self::PeerMapping) -> DevicePtr;
    /// Every peer has mapped `buffer`: the backend may drop whatever made it reachable by name
    /// (the CPU backend unlinks the segment, so a crash leaves nothing behind).
    fn peers_attached(buffer: &Self::SharedBuffer) -> Result<()> {
        let _ = buffer;
        Ok(())
    }

    /// Enqueues a copy of `bytes` from `src` to `dst` on `stream`.
    ///
    /// # Safety
    /// Both ranges must be valid device memory of this backend for `bytes` bytes, and not be
    /// freed or reused before the stream has executed the copy.
    unsafe fn copy(stream: &Self::Stream, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()>;
    /// Enqueues `kernel` on `stream`.
    ///
    /// A kernel that crosses ranks takes part in barriers with its peers, which must launch the
    /// same kernel with the same shape. The CPU backend runs the kernel before returning and reports a
    /// peer timeout as an error; GPU backends report it through the error word of the signal area.
    ///
    /// # Safety
    /// Every pointer in `params` must be valid for the access the kernel makes (see
    /// [`crate::cpu::kernels`] for the exact extents) until the stream has executed the launch.
    unsafe fn launch(
        device: &Self::Device,
        stream: &Self::Stream,
        kernel: KernelId,
        params: &LaunchParams,
    ) -> Result<()>;
    /// Reads `dst.len()` bytes at `src` back to the host, after all work on `stream`.
    ///
    /// # Safety
    /// `src` must be valid device memory for `dst.len()` bytes.
    unsafe fn read_back(stream: &Self::Stream, src: DevicePtr, dst: &mut [u8]) -> Result<()>;
    /// Writes `src` to `dst` (host to device), ordered after all work on `stream`.
    ///
    /// # Safety
    /// `dst` must be valid device memory for `src.len()` bytes.
    unsafe fn write(stream: &Self::Stream, dst: DevicePtr, src: &[u8]) -> Result<()>;
    /// Waits for all work on `stream`.
    fn synchronize(stream: &Self::Stream) -> Result<()>;
    /// Records an event on `stream`.
    fn record_event(stream: &Self::Stream) -> Result<Self::Event>;
    /// Time between two recorded events (waits for `end`).
    fn elapsed(start: &Self::Event, end: &Self::Event) -> Result<Duration>;
}

/// Who destroys a stream's handle: what a stream value owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamOwnership {
    /// Created by arfuse (`Backend::create_stream`); destroyed when the value is dropped.
    Owned,
    /// Shared with the caller's own runtime wrapper (a cudarc `Arc<CudaStream>`): destroyed by that
    /// wrapper when its last clone goes (and only if that wrapper created it), never by arfuse.
    Shared,
    /// A raw handle the caller owns (`from_raw`): never destroyed by arfuse; the caller keeps it
    /// alive for as long as the value (and any work enqueued through it) lives.
    Borrowed,
}

impl fmt::Display for StreamOwnership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamOwnership::Owned => "owned",
            StreamOwnership::Shared => "shared",
            StreamOwnership::Borrowed => "borrowed",
        })
    }
}

/// How work enqueued on a stream is ordered with the other users of a tensor whose owner tracks
/// its uses itself (cudarc's `CudaSlice`, which records a read and a write event per allocation
/// when its context manages synchronisation across streams).
///
/// An operator that reads such a tensor on `stream` calls [`before_read`](Self::before_read)
/// before it enqueues anything that reads it, and [`after_read`](Self::after_read) once all of
/// that work is enqueued; the exact counterpart of what the owner's own launches do.
pub trait StreamOrder<B: Backend>: Send + Sync {
    /// Makes `stream` wait for the memory's pending writes elsewhere. An error means the order
    /// could not be established: nothing that reads the memory may then be enqueued.
    fn before_read(&self, stream: &B::Stream) -> Result<()>;
    /// Tells the owner that `stream` reads the memory up to its current end (the owner keeps the
    /// memory alive and unwritten until then). Cannot fail: an error is parked where the owner
    /// reports its own (cudarc: the next call on the slice's context).
    fn after_read(&self, stream: &B::Stream);
}

/// [`StreamOrder`] for a tensor that is written: `stream` waits for every pending use (reads and
/// writes), and the owner learns that `stream` writes it up to its current end.
pub trait StreamOrderMut<B: Backend>: StreamOrder<B> {
    /// Makes `stream` wait for the memory's pending reads and writes elsewhere (see
    /// [`StreamOrder::before_read`]).
    fn before_write(&mut self, stream: &B::Stream) -> Result<()>;
    /// Tells the owner that `stream` writes the memory up to its current end (see
    /// [`StreamOrder::after_read`]).
    fn after_write(&mut self, stream: &B::Stream);
}

/// Memory that a backend's kernels can read: a typed, contiguous view of device memory.
///
/// # Safety
/// `device_ptr()` must point to `len()` valid elements of `Elem` in `B`'s memory space for as
/// long as the borrow lasts, provided that work using it on a stream is ordered through
/// [`stream_order`](Self::stream_order) where that returns `Some`.
pub unsafe trait DeviceSlice<B: Backend> {
    /// The element type.
    type Elem: crate::Element;
    /// The address of the first element.
    fn device_ptr(&self) -> DevicePtr;
    /// Number of elements.
    fn len(&self) -> usize;
    /// Whether the slice is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// How work that reads this memory on a stream must be ordered with its other users, for
    /// memory whose owner tracks its uses (cudarc's slices). `None` (the default): the memory is
    /// the caller's to order, by stream order or otherwise.
    fn stream_order(&self) -> Option<&dyn StreamOrder<B>> {
        None
    }
}

/// Memory that a backend's kernels can write. Same contract as [`DeviceSlice`], exclusively borrowed.
///
/// # Safety
/// As [`DeviceSlice`], and the memory must be writable and not aliased by any other live view.
pub unsafe trait DeviceSliceMut<B: Backend>: DeviceSlice<B> {
    /// As [`DeviceSlice::stream_order`], for work that writes the memory.
    fn stream_order_mut(&mut self) -> Option<&mut dyn StreamOrderMut<B>> {
        None
    }
}
