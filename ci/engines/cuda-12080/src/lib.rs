//! An engine crate on cudarc's `cuda-12080` that names an arfuse type and a cudarc type, so both
//! must compile into one build.

use std::sync::Arc;

/// One tensor-parallel layer's fused epilogue, next to the engine's own CUDA context.
pub struct Layer {
    /// The engine's context (cudarc, CUDA 12.8 bindings).
    pub ctx: Arc<cudarc::driver::CudaContext>,
    /// arfuse's operator on the cuda backend.
    pub epilogue: arfuse_fusion::AllReduceRmsNorm<arfuse_fusion::kernels::cuda::Cuda>,
}
