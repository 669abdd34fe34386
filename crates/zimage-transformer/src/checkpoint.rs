//! The one place where checkpoint names become module paths.
//!
//! Module paths are the diffusers names (`layers.0.attention.to_q.weight`), so a diffusers
//! checkpoint maps to itself. The original/ComfyUI single file (`z_image_turbo_bf16.safetensors`)
//! is renamed the way diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` does it.

use zimage_nn::KeyMapping;

use crate::ZImageTransformerConfig;

/// Prefix of ComfyUI saves.
const COMFY_PREFIX: &str = "model.diffusion_model.";

/// Maps one tensor of a diffusers or original-format checkpoint to the module path(s) it fills.
pub fn map_key(config: &ZImageTransformerConfig, name: &str, shape: &[usize]) -> KeyMapping {
    let name = name.strip_prefix(COMFY_PREFIX).unwrap_or(name);
    // An unused Lumina2 leftover some ComfyUI saves carry.
    if name == "norm_final.weight" {
        return KeyMapping::Ignore;
    }
    let patch_key = config.patch_key(0);
    let name = if let Some(rest) = name.strip_prefix("final_layer.") {
        format!("all_final_layer.{patch_key}.{rest}")
    } else if let Some(rest) = name.strip_prefix("x_embedder.") {
        format!("all_x_embedder.{patch_key}.{rest}")
    } else {
        name.to_string()
    };
    if let Some(block) = name.strip_suffix(".attention.qkv.weight") {
        // Fused [3 * dim, dim] in q, k, v order.
        let rows = shape.first().copied().unwrap_or(0) / 3;
        return KeyMapping::Split(
            ["to_q", "to_k", "to_v"]
                .iter()
                .enumerate()
                .map(|(i, part)| {
                    (
                        format!("{block}.attention.{part}.weight"),
                        i * rows..(i + 1) * rows,
                    )
                })
                .collect(),
        );
    }
    let name = name
        .replace(".attention.out.", ".attention.to_out.0.")
        .replace(".attention.q_norm.", ".attention.norm_q.")
        .replace(".attention.k_norm.", ".attention.norm_k.");
    KeyMapping::To(name)
}
