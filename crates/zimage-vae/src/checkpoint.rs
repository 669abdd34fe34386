//! The one place where checkpoint names become module paths.
//!
//! Module paths are the diffusers names (`encoder.down_blocks.0.resnets.1.conv1.weight`,
//! `decoder.mid_block.attentions.0.to_q.weight`), so a diffusers checkpoint maps to itself. The
//! original BFL `ae.safetensors` (the LDM naming, also found under `first_stage_model.` in Stable
//! Diffusion single files) is renamed the way diffusers' `convert_ldm_vae_checkpoint`
//! (`diffusers/loaders/single_file_utils.py`) does it; note that its decoder `up.N` runs in the
//! opposite order to diffusers' `up_blocks`, and that its attention projections are 1x1 convs.

use std::path::Path;

use zimage_nn::{Checkpoint, KeyMapping};

use crate::{AutoencoderKLConfig, VaeError};

/// Prefixes of a VAE inside a bigger LDM checkpoint, in the order diffusers tries them (the last
/// one present wins).
const LDM_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];

/// How a checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// diffusers `AutoencoderKL` names, which are the module paths.
    Diffusers,
    /// BFL `ae.safetensors` / LDM names (`encoder.down.0.block.1`, `mid.attn_1.q`, `norm_out`).
    Bfl,
}

/// How the mid-block attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`) are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProjectionLayout {
    /// `nn.Linear` weights, `[out, in]` (diffusers).
    #[default]
    Linear,
    /// 1x1 conv weights, `[out, in, 1, 1]` (BFL).
    Conv1x1,
}

/// What [`detect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFormat {
    pub naming: Naming,
    /// Stripped from every VAE tensor name; tensors without it are ignored (the rest of an LDM
    /// single file). Empty for a stand-alone VAE file.
    pub prefix: String,
    pub attention: ProjectionLayout,
}

impl CheckpointFormat {
    /// A diffusers checkpoint without prefix.
    pub fn diffusers() -> Self {
        Self {
            naming: Naming::Diffusers,
            prefix: String::new(),
            attention: ProjectionLayout::Linear,
        }
    }
}

/// Recognises the naming of `checkpoint` from its tensor names.
pub fn detect(checkpoint: &Checkpoint) -> Result<CheckpointFormat, VaeError> {
    let names: Vec<&str> = checkpoint.entries().map(|(name, _)| name).collect();
    let shape_of = |name: &str| checkpoint.get(name).map(|entry| entry.shape.clone());
    detect_names(&names, shape_of, checkpoint.origin())
}

/// [`detect`] on a list of names; `shape_of` gives a tensor's shape.
pub fn detect_names(
    names: &[&str],
    shape_of: impl Fn(&str) -> Option<Vec<usize>>,
    origin: &Path,
) -> Result<CheckpointFormat, VaeError> {
    let prefix = LDM_PREFIXES
        .iter()
        .rev()
        .find(|p| names.iter().any(|n| n.starts_with(*p)))
        .copied()
        .unwrap_or_default();
    let stripped: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_prefix(prefix))
        .collect();
    let is_diffusers = |n: &str| {
        n.starts_with("encoder.down_blocks.")
            || n.starts_with("decoder.up_blocks.")
            || n.contains(".mid_block.")
    };
    let is_bfl = |n: &str| {
        n.starts_with("encoder.down.")
            || n.starts_with("decoder.up.")
            || n.starts_with("encoder.mid.")
            || n.starts_with("decoder.mid.")
    };
    let diffusers = stripped.iter().any(|n| is_diffusers(n));
    let bfl = stripped.iter().any(|n| is_bfl(n));
    let naming = match (diffusers, bfl) {
        (true, false) => Naming::Diffusers,
        (false, true) => Naming::Bfl,
        (true, true) => {
            return Err(VaeError::UnknownFormat {
                file: origin.to_path_buf(),
                found: format!(
                    "a mix of diffusers names ({}) and BFL names ({})",
                    stripped.iter().find(|n| is_diffusers(n)).unwrap_or(&""),
                    stripped.iter().find(|n| is_bfl(n)).unwrap_or(&"")
                ),
            })
        }
        (false, false) => {
            return Err(VaeError::UnknownFormat {
                file: origin.to_path_buf(),
                found: describe(names),
            })
        }
    };
    let format = CheckpointFormat {
        naming,
        prefix: prefix.to_string(),
        attention: ProjectionLayout::Linear,
    };
    // The layout of the projections, from whichever `to_q` weight the file has.
    let attention = names
        .iter()
        .find(|n| {
            diffusers_name(&format, usize::MAX, n)
                .is_some_and(|path| path.ends_with("mid_block.attentions.0.to_q.weight"))
        })
        .and_then(|n| shape_of(n))
        .map(|shape| {
            if shape.len() == 4 {
                ProjectionLayout::Conv1x1
            } else {
                ProjectionLayout::Linear
            }
        })
        .unwrap_or_default();
    Ok(CheckpointFormat {
        attention,
        ..format
    })
}

/// What a checkpoint that is not a VAE looks like, for the error message.
fn describe(names: &[&str]) -> String {
    let known = [
        ("double_blocks.", "a FLUX transformer"),
        ("model.diffusion_model.", "a diffusion model single file"),
        ("layers.0.attention.", "a Z-Image transformer"),
        ("model.layers.", "a language model (text encoder)"),
        ("text_model.", "a CLIP text encoder"),
    ];
    let example: Vec<&str> = names.iter().take(3).copied().collect();
    let kind = known
        .iter()
        .find(|(prefix, _)| names.iter().any(|n| n.starts_with(prefix)))
        .map(|(_, kind)| format!("{kind}, "))
        .unwrap_or_default();
    if names.is_empty() {
        "no tensors".into()
    } else {
        format!(
            "{kind}{} tensors named like {}",
            names.len(),
            example.join(", ")
        )
    }
}

/// Maps one tensor of a checkpoint in `format` to the module path it fills.
pub fn map_key(
    format: &CheckpointFormat,
    config: &AutoencoderKLConfig,
    name: &str,
    _shape: &[usize],
) -> KeyMapping {
    if !name.starts_with(format.prefix.as_str()) {
        return KeyMapping::Ignore;
    }
    match diffusers_name(format, config.num_blocks(), name) {
        Some(path) => KeyMapping::To(path),
        // Unknown names stay as they are and are reported as unexpected.
        None => KeyMapping::To(name.to_string()),
    }
}

/// The diffusers name (module path) of a checkpoint tensor, `None` when the name is not one the
/// format has. `num_blocks` is needed to reverse BFL's decoder block order.
pub fn diffusers_name(format: &CheckpointFormat, num_blocks: usize, name: &str) -> Option<String> {
    let name = name.strip_prefix(format.prefix.as_str())?;
    match format.naming {
        Naming::Diffusers => Some(undeprecate(name)),
        Naming::Bfl => bfl_to_diffusers(name, num_blocks),
    }
}

/// Old diffusers saves name the mid-block attention `query`/`key`/`value`/`proj_attn`
/// (`_convert_deprecated_attention_blocks` renames them the same way).
fn undeprecate(name: &str) -> String {
    if !name.contains(".attentions.") {
        return name.to_string();
    }
    name.replace(".query.", ".to_q.")
        .replace(".key.", ".to_k.")
        .replace(".value.", ".to_v.")
        .replace(".proj_attn.", ".to_out.0.")
}

fn bfl_to_diffusers(name: &str, num_blocks: usize) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let index = |s: &str| s.parse::<usize>().ok();
    // Resnets call their shortcut `nin_shortcut` in BFL, `conv_shortcut` in diffusers.
    fn resnet_layer(layer: &str) -> &str {
        match layer {
            "nin_shortcut" => "conv_shortcut",
            other => other,
        }
    }
    // Decoder blocks run in opposite orders: BFL `up.0` works at full resolution, diffusers
    // `up_blocks.0` right after the mid block.
    let reversed = |b: &str| num_blocks.checked_sub(1)?.checked_sub(index(b)?);
    let (head, tail): (String, &[&str]) = match parts.as_slice() {
        ["quant_conv" | "post_quant_conv", _] => return Some(name.to_string()),
        ["encoder" | "decoder", "conv_in" | "conv_out", _] => return Some(name.to_string()),
        [side @ ("encoder" | "decoder"), "norm_out", tail @ ..] => {
            (format!("{side}.conv_norm_out"), tail)
        }
        ["encoder", "down", i, "block", j, layer, tail @ ..] => (
            format!(
                "encoder.down_blocks.{}.resnets.{}.{}",
                index(i)?,
                index(j)?,
                resnet_layer(layer)
            ),
            tail,
        ),
        ["encoder", "down", i, "downsample", tail @ ..] => (
            format!("encoder.down_blocks.{}.downsamplers.0", index(i)?),
            tail,
        ),
        ["decoder", "up", b, "block", j, layer, tail @ ..] => (
            format!(
                "decoder.up_blocks.{}.resnets.{}.{}",
                reversed(b)?,
                index(j)?,
                resnet_layer(layer)
            ),
            tail,
        ),
        ["decoder", "up", b, "upsample", tail @ ..] => (
            format!("decoder.up_blocks.{}.upsamplers.0", reversed(b)?),
            tail,
        ),
        [side @ ("encoder" | "decoder"), "mid", block, layer, tail @ ..]
            if block.starts_with("block_") =>
        {
            // `block_1`, `block_2` -> `resnets.0`, `resnets.1`
            let k = index(block.strip_prefix("block_")?)?.checked_sub(1)?;
            (
                format!("{side}.mid_block.resnets.{k}.{}", resnet_layer(layer)),
                tail,
            )
        }
        [side @ ("encoder" | "decoder"), "mid", "attn_1", layer, tail @ ..] => {
            let layer = match *layer {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            (format!("{side}.mid_block.attentions.0.{layer}"), tail)
        }
        _ => return None,
    };
    if tail.is_empty() {
        return None;
    }
    Some(format!("{head}.{}", tail.join(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bfl() -> CheckpointFormat {
        CheckpointFormat {
            naming: Naming::Bfl,
            prefix: String::new(),
            attention: ProjectionLayout::Conv1x1,
        }
    }

    #[test]
    fn bfl_names_map_like_convert_ldm_vae_checkpoint() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
            ("encoder.norm_out.bias", "encoder.conv_norm_out.bias"),
            ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
            ),
            (
                "encoder.mid.block_2.norm1.weight",
                "encoder.mid_block.resnets.1.norm1.weight",
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "decoder.mid.attn_1.norm.bias",
                "decoder.mid_block.attentions.0.group_norm.bias",
            ),
            // decoder blocks run in reverse: BFL up.3 is the first diffusers up block
            (
                "decoder.up.3.block.2.conv2.weight",
                "decoder.up_blocks.0.resnets.2.conv2.weight",
            ),
            (
                "decoder.up.0.block.0.nin_shortcut.bias",
                "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            ("quant_conv.weight", "quant_conv.weight"),
            ("post_quant_conv.bias", "post_quant_conv.bias"),
        ];
        for (from, to) in cases {
            assert_eq!(
                diffusers_name(&bfl(), 4, from).as_deref(),
                Some(to),
                "{from}"
            );
        }
        for unknown in [
            "decoder.up.4.block.0.conv1.weight",
            "encoder.mid.attn_1.qkv.weight",
            "encoder.down.x.block.0.conv1.weight",
            "something.else",
        ] {
            assert_eq!(diffusers_name(&bfl(), 4, unknown), None, "{unknown}");
        }
    }

    #[test]
    fn deprecated_diffusers_attention_names() {
        let f = CheckpointFormat::diffusers();
        assert_eq!(
            diffusers_name(&f, 4, "encoder.mid_block.attentions.0.proj_attn.bias").as_deref(),
            Some("encoder.mid_block.attentions.0.to_out.0.bias")
        );
        assert_eq!(
            diffusers_name(&f, 4, "encoder.mid_block.attentions.0.query.weight").as_deref(),
            Some("encoder.mid_block.attentions.0.to_q.weight")
        );
    }

    #[test]
    fn detects_formats_and_prefixes() {
        let origin = Path::new("x.safetensors");
        let conv = |_: &str| Some(vec![8, 8, 1, 1]);
        let f = detect_names(
            &[
                "encoder.mid.attn_1.q.weight",
                "decoder.up.0.block.0.conv1.weight",
            ],
            conv,
            origin,
        )
        .unwrap();
        assert_eq!(f, bfl());
        let f = detect_names(
            &[
                "first_stage_model.encoder.down.0.block.0.conv1.weight",
                "model.diffusion_model.x",
            ],
            conv,
            origin,
        )
        .unwrap();
        assert_eq!(f.prefix, "first_stage_model.");
        assert_eq!(f.naming, Naming::Bfl);
        let f = detect_names(
            &["encoder.mid_block.attentions.0.to_q.weight"],
            |_| Some(vec![8, 8]),
            origin,
        )
        .unwrap();
        assert_eq!(f, CheckpointFormat::diffusers());
        let err = detect_names(&["double_blocks.0.img_attn.qkv.weight"], conv, origin).unwrap_err();
        assert!(err.to_string().contains("FLUX transformer"), "{err}");
        let err = detect_names(
            &[
                "encoder.down.0.block.0.conv1.weight",
                "encoder.down_blocks.0.resnets.0.conv1.weight",
            ],
            conv,
            origin,
        )
        .unwrap_err();
        assert!(err.to_string().contains("mix"), "{err}");
    }
}
