//! What a generation needs in memory, estimated before anything is loaded, so that a run that
//! cannot fit is refused with the ways out instead of being killed halfway.

use std::fmt;

use burn::tensor::DType;
use zimage_nn::{Checkpoint, Precision, StoredDtype};

use crate::{GenerateOptions, PipelineError};

/// Bytes one stage of a generation holds at its largest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageMemory {
    pub stage: &'static str,
    /// The component's weights as they will be held.
    pub weights: u64,
    /// Its largest working set (activations) at this size and batch.
    pub activations: u64,
}

/// The staged pipeline's memory: one large component is resident at a time, unless models are
/// kept resident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub stages: Vec<StageMemory>,
    pub keep_models: bool,
}

impl MemoryEstimate {
    /// The peak: the largest stage, or every component's weights plus the largest working set
    /// when models stay resident.
    pub fn peak(&self) -> u64 {
        let activations = self.stages.iter().map(|s| s.activations).max().unwrap_or(0);
        if self.keep_models {
            self.stages.iter().map(|s| s.weights).sum::<u64>() + activations
        } else {
            self.stages
                .iter()
                .map(|s| s.weights + s.activations)
                .max()
                .unwrap_or(0)
        }
    }

    /// The stage that sets the peak.
    pub fn largest(&self) -> Option<&StageMemory> {
        self.stages.iter().max_by_key(|s| s.weights + s.activations)
    }
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "about {}", gib(self.peak()))?;
        if let Some(s) = self.largest().filter(|_| !self.keep_models) {
            write!(
                f,
                " ({}: weights {} + working memory {})",
                s.stage,
                gib(s.weights),
                gib(s.activations)
            )?;
        }
        Ok(())
    }
}

/// `12.3 GiB`, or `3.5 MiB` below one GiB.
pub fn gib(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    }
}

/// Bytes a checkpoint's tensors take once loaded: matrices (rank 2 and more) as `precision`
/// holds them, the rest in the compute dtype. GGUF blocks stay quantized unless a weights dtype
/// is asked for: on the host the file's own blocks, on a device packed codes with per-group f32
/// scales (and offsets), as `QuantizedMatrix` holds them.
pub fn held_bytes(
    checkpoint: &Checkpoint,
    precision: Precision,
    host: bool,
    supported: impl Fn(DType) -> bool,
) -> u64 {
    checkpoint
        .entries()
        .map(|(_, entry)| {
            let elements = entry.shape.iter().product::<usize>() as u64;
            match entry.dtype {
                StoredDtype::Quantized(ty)
                    if entry.shape.len() >= 2 && precision.weights.is_none() =>
                {
                    if host {
                        elements / ty.block_size() as u64 * ty.block_bytes() as u64
                    } else {
                        let groups = elements / ty.group_size() as u64;
                        elements * u64::from(ty.code_bits()) / 8
                            + groups * 4 * (1 + u64::from(ty.has_offset()))
                    }
                }
                stored => {
                    let dtype = if entry.shape.len() >= 2 {
                        precision.matrix_dtype(Some(stored), host, &supported)
                    } else {
                        precision.compute
                    };
                    elements * dtype.size() as u64
                }
            }
        })
        .sum()
}

/// Working memory of each stage at `options`' size and batch, in the compute dtype (at least
/// 4 bytes: the CPU computes in f32), counted as the buffers alive at once: the text encoder's
/// activations per token (residual, norms, q/k/v, attention output, both SwiGLU halves), the
/// DiT's unified sequence through a block (the same), the VAE's largest feature map three times
/// (input, output and the im2col / normalisation buffers). Checked against measured peaks at the
/// published sizes in docs/benchmarks.md.
pub(crate) fn activations(
    options: &GenerateOptions,
    text: &zimage_text::Qwen3Config,
    dit: &zimage_transformer::ZImageTransformerConfig,
    vae: &zimage_vae::AutoencoderKLConfig,
    compute: DType,
) -> [u64; 3] {
    let size = compute.size().max(4) as u64;
    let prompts = options.prompts.len() as u64;
    let tokens = options.max_sequence_length.min(1 << 16) as u64;
    let text_bytes =
        prompts * tokens * (6 * text.hidden_size as u64 + 3 * text.intermediate_size as u64) * size;
    let images = (options.prompts.len() * options.num_images_per_prompt) as u64;
    let batch = if options.guidance_enabled() {
        2 * images
    } else {
        images
    };
    let f = vae.downscale_factor() as u64 * 2;
    let image_tokens = (options.height as u64 / f) * (options.width as u64 / f);
    let caption = tokens.next_multiple_of(32);
    let dit_bytes = batch
        * (image_tokens + caption)
        * (8 * dit.dim as u64 + 2 * dit.ffn_hidden_dim() as u64)
        * size;
    let (h, w) = match options.vae_tiling {
        Some(t) => (
            options.height.min(t.tile_sample_min_size),
            options.width.min(t.tile_sample_min_size),
        ),
        None => (options.height, options.width),
    };
    let largest = vae.largest_activation(images as usize, h, w, true);
    let vae_bytes = 3 * largest.iter().map(|&d| d as u64).product::<u64>() * size;
    [text_bytes, dit_bytes, vae_bytes]
}

/// Environment variable that sets the memory a run may use, in bytes or with a `K`/`M`/`G`
/// suffix (binary units): for machines whose limits the kernel does not report, and for tests.
pub const AVAILABLE_MEMORY_VAR: &str = "ZIMAGE_AVAILABLE_MEMORY";

/// What a new allocation can get without swapping or being killed: `ZIMAGE_AVAILABLE_MEMORY`
/// when set, else the smaller of `MemAvailable` (`/proc/meminfo`) and the room left under this
/// process's cgroup v2 limit (containers: `MemAvailable` shows the whole host's memory).
/// `None` where the kernel does not say (not Linux).
pub fn available_host_memory() -> Result<Option<u64>, PipelineError> {
    if let Ok(value) = std::env::var(AVAILABLE_MEMORY_VAR) {
        return parse_bytes(&value).map(Some).ok_or_else(|| {
            PipelineError::Invalid(format!(
                "{AVAILABLE_MEMORY_VAR}={value} is not a byte count (for example 12G)"
            ))
        });
    }
    Ok(mem_available().map(|available| match cgroup_room() {
        Some(room) => room.min(available),
        None => available,
    }))
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `memory.max - memory.current` of this process's cgroup (v2), when it has a limit.
fn cgroup_room() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = membership.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?; // "max": no limit
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// `123`, `512M`, `12G`, `12GiB` -> bytes.
fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let number: f64 = text[..digits].parse().ok()?;
    let unit = match text[digits..]
        .trim()
        .trim_end_matches("iB")
        .trim_end_matches('B')
    {
        "" => 1u64,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        _ => return None,
    };
    Some((number * unit as f64) as u64)
}

/// Refuses a run whose estimate exceeds `available`, naming the ways out.
pub fn check_fits(
    estimate: &MemoryEstimate,
    available: u64,
    device: &str,
) -> Result<(), PipelineError> {
    if estimate.peak() <= available {
        return Ok(());
    }
    Err(PipelineError::OutOfMemory {
        needed: estimate.to_string(),
        available: gib(available),
        device: device.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_parse_with_binary_units() {
        assert_eq!(parse_bytes("1234"), Some(1234));
        assert_eq!(parse_bytes("512M"), Some(512 << 20));
        assert_eq!(parse_bytes("12GiB"), Some(12 << 30));
        assert_eq!(parse_bytes("1.5G"), Some(3 << 29));
        assert_eq!(parse_bytes("12 parsecs"), None);
    }
}
