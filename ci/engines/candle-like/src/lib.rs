//! An engine crate with candle's cudarc configuration that names an arfuse type and a cudarc type,
//! so both must compile into one build, and calls the operator the way an engine on cudarc does:
//! its own stream and its own `CudaSlice`s, with no `unsafe` (the crate forbids it).

#![forbid(unsafe_code)]

use arfuse_fusion::kernels::cuda::{Cuda, CudaDevice, CudaStream};
use arfuse_fusion::kernels::Element;
use arfuse_fusion::{AllReduceRmsNorm, Args, Path, TensorMut, TensorRef};
use cudarc::driver::{CudaSlice, CudaStream as EngineStream, CudaView};
use std::sync::Arc;

/// One tensor-parallel layer's fused epilogue, next to the engine's own CUDA context.
pub struct Layer {
    /// The engine's context (cudarc, linked at build time).
    pub ctx: Arc<cudarc::driver::CudaContext>,
    /// arfuse's operator on the cuda backend.
    pub epilogue: AllReduceRmsNorm<arfuse_fusion::kernels::cuda::Cuda>,
    /// The engine's stream, shared with arfuse (`CudaStream::from_cudarc`).
    pub stream: CudaStream,
}

impl Layer {
    /// The operator's stream is the engine's own: its calls are ordered with the engine's kernels
    /// and recorded by a graph the engine captures on that stream.
    pub fn on_engine_stream(
        ctx: Arc<cudarc::driver::CudaContext>,
        device: &CudaDevice,
        engine: &Arc<EngineStream>,
        epilogue: AllReduceRmsNorm<Cuda>,
    ) -> arfuse_fusion::Result<Layer> {
        let stream = CudaStream::from_cudarc(device, engine.clone())?;
        Ok(Layer { ctx, epilogue, stream })
    }

    /// The epilogue in place: `hidden_states` becomes the normalised output, `residual` the new
    /// residual.
    pub fn epilogue_in_place<T: Element>(
        &mut self,
        hidden_states: &mut CudaSlice<T>,
        residual: &mut CudaSlice<T>,
        weight: &CudaSlice<T>,
        eps: f32,
    ) -> arfuse_fusion::Result<Path> {
        self.epilogue.forward(&self.stream, Args::in_place(hidden_states, residual, weight, eps))
    }

    /// The epilogue out of place, on views of the engine's tensors.
    pub fn epilogue<T: Element>(
        &mut self,
        input: &CudaView<'_, T>,
        residual: &CudaView<'_, T>,
        weight: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
        residual_out: &mut CudaSlice<T>,
        eps: f32,
    ) -> arfuse_fusion::Result<Path> {
        let args = Args {
            input: TensorRef::new(input),
            residual: TensorRef::new(residual),
            weight: TensorRef::new(weight),
            out: TensorMut::new(out),
            residual_out: TensorMut::new(residual_out),
            eps,
        };
        self.epilogue.forward(&self.stream, args)
    }
}
