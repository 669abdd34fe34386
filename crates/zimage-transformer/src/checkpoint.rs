//! The one place where checkpoint names become module paths.
//!
//! Module paths are the diffusers names (`layers.0.attention.to_q.weight`), so a diffusers
//! checkpoint maps to itself. The original/ComfyUI single file (`z_image_turbo_bf16.safetensors`)
//! is renamed the way diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` does it.

use zimage_nn::KeyMapping;

use crate::ZImageTransformerConfig;

/// Prefix of ComfyUI saves.
pub(crate) const COMFY_PREFIX: &str = "model.diffusion_model.";

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

/// Maps one tensor of a ControlNet single file (alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union).
///
/// The released files already carry diffusers' module names (`control_layers.0.attention.to_q.weight`,
/// `control_all_x_embedder.2-1.weight`): diffusers' `convert_z_image_controlnet_checkpoint_to_diffusers`
/// renames nothing. It only drops `control_noise_refiner.*` for the 2.0 layout, whose control layers
/// also serve as the refiner (`drop_noise_refiner`). Names in the original transformer style (fused
/// `qkv`, `out`, `q_norm`, a ComfyUI prefix) are accepted as the transformer's are.
pub fn map_controlnet_key(
    config: &ZImageTransformerConfig,
    drop_noise_refiner: bool,
    name: &str,
    shape: &[usize],
) -> KeyMapping {
    let bare = name.strip_prefix(COMFY_PREFIX).unwrap_or(name);
    if drop_noise_refiner && bare.starts_with("control_noise_refiner.") {
        return KeyMapping::Ignore;
    }
    map_key(config, name, shape)
}

/// The original/ComfyUI name (without the `model.diffusion_model.` prefix) of a module path: the
/// inverse of [`map_key`], for writers of that format. `to_q`'s weight names the fused `qkv`
/// (q, k and v rows in that order); the `to_k` and `to_v` weights give `None`, being rows of it.
pub fn original_name(config: &ZImageTransformerConfig, path: &str) -> Option<String> {
    if path.ends_with(".attention.to_k.weight") || path.ends_with(".attention.to_v.weight") {
        return None;
    }
    if let Some(block) = path.strip_suffix(".attention.to_q.weight") {
        return Some(format!("{block}.attention.qkv.weight"));
    }
    let patch_key = config.patch_key(0);
    let name = if let Some(rest) = path.strip_prefix(&format!("all_final_layer.{patch_key}.")) {
        format!("final_layer.{rest}")
    } else if let Some(rest) = path.strip_prefix(&format!("all_x_embedder.{patch_key}.")) {
        format!("x_embedder.{rest}")
    } else {
        path.to_string()
    };
    Some(
        name.replace(".attention.to_out.0.", ".attention.out.")
            .replace(".attention.norm_q.", ".attention.q_norm.")
            .replace(".attention.norm_k.", ".attention.k_norm."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_names_map_back_to_their_module_paths() {
        let config = ZImageTransformerConfig::z_image_turbo();
        for path in [
            "layers.3.attention.to_out.0.weight",
            "layers.3.attention.norm_q.weight",
            "noise_refiner.1.attention.norm_k.weight",
            "all_final_layer.2-1.linear.bias",
            "all_x_embedder.2-1.weight",
            "cap_embedder.1.weight",
            "t_embedder.mlp.0.weight",
        ] {
            let original = original_name(&config, path).unwrap();
            match map_key(&config, &format!("{COMFY_PREFIX}{original}"), &[4, 4]) {
                KeyMapping::To(back) => assert_eq!(back, path, "{original}"),
                other => panic!("{path} -> {original} -> {other:?}"),
            }
        }
        let fused = original_name(&config, "layers.0.attention.to_q.weight").unwrap();
        assert_eq!(fused, "layers.0.attention.qkv.weight");
        match map_key(&config, &fused, &[12, 4]) {
            KeyMapping::Split(parts) => {
                let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(
                    names,
                    [
                        "layers.0.attention.to_q.weight",
                        "layers.0.attention.to_k.weight",
                        "layers.0.attention.to_v.weight"
                    ]
                );
                assert_eq!(parts[2].1, 8..12);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            original_name(&config, "layers.0.attention.to_k.weight"),
            None
        );
        assert_eq!(
            original_name(&config, "layers.0.attention.to_v.weight"),
            None
        );
    }
}
