//! LoRA-family adapters on the transformer: which layers they may change, under which names, and
//! applying a matched set ([`zimage_lora`]).

use zimage_lora::{Resolved, Target};
use zimage_nn::{KeyMapping, Linear, ZBackend};

use crate::block::ZImageTransformerBlock;
use crate::checkpoint::{map_key, original_name};
use crate::{TransformerError, ZImageTransformer2DModel, ZImageTransformerConfig};

impl<B: ZBackend> ZImageTransformer2DModel<B> {
    /// Every layer an adapter may change: each Linear under its diffusers name, and under its
    /// original/ComfyUI name (`attention.qkv`, the rows of `to_q`, `to_k` and `to_v`;
    /// `attention.out`; `x_embedder`; `final_layer.*`), found from the checkpoint mapping.
    /// Nothing is loaded.
    pub fn adapter_targets(
        config: &ZImageTransformerConfig,
        device: &B::Device,
    ) -> Result<Vec<Target>, TransformerError> {
        config.validate()?;
        let tensors =
            zimage_nn::weights::expected_tensors::<B, _>(device, |w| Self::build(config, w))?;
        let mut targets = Vec::new();
        let mut aliases = Vec::new();
        for (path, shape) in tensors {
            let (Some(layer), &[out, inp]) = (path.strip_suffix(".weight"), shape.as_slice())
            else {
                continue;
            };
            targets.push(Target::layer(layer, [out, inp]));
            let Some(original) = original_name(config, &path).filter(|o| *o != path) else {
                continue;
            };
            let name = original.trim_end_matches(".weight").to_string();
            let parts = |rows: usize| match map_key(config, &original, &[rows, inp]) {
                KeyMapping::Split(parts) => parts,
                KeyMapping::To(to) => vec![(to, 0..rows)],
                KeyMapping::Ignore => Vec::new(),
            };
            // A fused weight holds each part's rows: size it from the number of parts.
            let rows = out * parts(out).len().max(1);
            let parts = parts(rows)
                .into_iter()
                .map(|(p, r)| (p.trim_end_matches(".weight").to_string(), r))
                .collect();
            aliases.push(Target {
                name,
                shape: [rows, inp],
                parts,
            });
        }
        targets.extend(aliases);
        Ok(targets)
    }

    /// Applies `adapters` (matched with [`Self::adapter_targets`]) in place of the previous
    /// set; an empty set restores the weights as loaded, exactly.
    pub fn set_adapters(&mut self, adapters: &Resolved) {
        let device = self.x_pad_token.device();
        let dtype = self.dtype();
        self.for_each_linear(&mut |path, linear| {
            linear.set_delta(adapters.delta(path).as_ref(), &device, dtype)
        });
    }

    /// Every Linear with its module path.
    pub fn for_each_linear(&mut self, f: &mut dyn FnMut(&str, &mut Linear<B>)) {
        let patch = self.config().patch_key(0);
        for linear in &mut self.x_embedders {
            f(&format!("all_x_embedder.{patch}"), linear);
        }
        for layer in &mut self.final_layers {
            f(
                &format!("all_final_layer.{patch}.adaLN_modulation.1"),
                &mut layer.modulation,
            );
            f(
                &format!("all_final_layer.{patch}.linear"),
                &mut layer.linear,
            );
        }
        f("t_embedder.mlp.0", &mut self.t_embedder.mlp_0);
        f("t_embedder.mlp.2", &mut self.t_embedder.mlp_2);
        f("cap_embedder.1", &mut self.cap_embedder.linear);
        for (name, blocks) in [
            ("noise_refiner", &mut self.noise_refiner),
            ("context_refiner", &mut self.context_refiner),
            ("layers", &mut self.layers),
        ] {
            for (i, block) in blocks.iter_mut().enumerate() {
                block_linears(&format!("{name}.{i}"), block, f);
            }
        }
    }
}

fn block_linears<B: ZBackend>(
    prefix: &str,
    block: &mut ZImageTransformerBlock<B>,
    f: &mut dyn FnMut(&str, &mut Linear<B>),
) {
    let attention = &mut block.attention;
    for (name, linear) in [
        ("attention.to_q", &mut attention.to_q),
        ("attention.to_k", &mut attention.to_k),
        ("attention.to_v", &mut attention.to_v),
        ("attention.to_out.0", &mut attention.to_out),
        ("feed_forward.w1", &mut block.feed_forward.w1),
        ("feed_forward.w2", &mut block.feed_forward.w2),
        ("feed_forward.w3", &mut block.feed_forward.w3),
    ] {
        f(&format!("{prefix}.{name}"), linear);
    }
    if let Some(modulation) = &mut block.modulation {
        f(&format!("{prefix}.adaLN_modulation.0"), modulation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::DType;

    /// Guards `for_each_linear` against drifting from the loader: every Linear the checkpoint
    /// fills is visited under the same path, once.
    #[test]
    fn every_loaded_linear_is_visited_under_its_checkpoint_path() {
        let config = ZImageTransformerConfig {
            dim: 64,
            n_layers: 2,
            n_refiner_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            cap_feat_dim: 32,
            axes_dims: vec![8, 12, 12],
            axes_lens: vec![64, 32, 32],
            ..Default::default()
        };
        let device = Default::default();
        let targets =
            ZImageTransformer2DModel::<NdArray>::adapter_targets(&config, &device).unwrap();
        let mut want: Vec<String> = targets
            .iter()
            .filter(|t| t.parts.len() == 1 && t.parts[0].0 == t.name)
            .map(|t| t.name.clone())
            .collect();
        let mut model =
            ZImageTransformer2DModel::<NdArray>::random(&config, &device, DType::F32).unwrap();
        let mut seen = Vec::new();
        model.for_each_linear(&mut |path, linear| {
            let target = targets.iter().find(|t| t.name == path).expect(path);
            assert_eq!(
                target.shape,
                [linear.out_features(), linear.in_features()],
                "{path}"
            );
            seen.push(path.to_string());
        });
        want.sort();
        seen.sort();
        assert_eq!(seen, want);
        let qkv = targets
            .iter()
            .find(|t| t.name == "layers.0.attention.qkv")
            .unwrap();
        assert_eq!(qkv.shape[0], 3 * config.dim);
        assert_eq!(
            qkv.parts[2],
            (
                "layers.0.attention.to_v".to_string(),
                2 * config.dim..3 * config.dim
            )
        );
    }
}
