//! Per-device tensor size limits (`zimage_nn::device`), as wgpu needs them, enforced on ndarray
//! with artificial limits: loading refuses a weight by name, a forward pass refuses its largest
//! activation, and the VAE finds a tiling that fits.
//!
//! The limit is process-wide state keyed by backend type and device: this test runs its own
//! backend type (`NdArray<f32, i32>`), so the other tests of this binary, on `NdArray<f32>`,
//! never see its limits.

use zimage_test_support as common;

use burn::backend::NdArray;
use burn::tensor::{DType, Tensor};
use common::{fixtures, Case};
use zimage_nn::device::{clear_max_tensor_bytes, set_max_tensor_bytes};
use zimage_nn::CheckpointError;
use zimage_transformer::{TransformerError, ZImageTransformer2DModel};
use zimage_vae::{AutoencoderKL, VaeError};

type B = NdArray<f32, i32>;

/// Clears the limits when the test ends, passed or failed.
struct ClearLimits;

impl Drop for ClearLimits {
    fn drop(&mut self) {
        clear_max_tensor_bytes::<B>(&Default::default());
    }
}

#[test]
fn limits_are_enforced_by_loaders_and_passes() {
    let _clear = ClearLimits;
    let device = Default::default();
    let transformer_dir = fixtures().join("transformer/a");

    // Loading: the first weight over 1 KiB is refused, with its name and both sizes.
    set_max_tensor_bytes::<B>(&device, 1024);
    let err = ZImageTransformer2DModel::<B>::from_folder(
        transformer_dir.join("transformer"),
        &device,
        DType::F32,
    )
    .expect_err("weights over the limit");
    let text = err.to_string();
    println!("{text}");
    assert!(
        matches!(
            err,
            TransformerError::Checkpoint(CheckpointError::TooLarge { .. })
        ),
        "{text}"
    );
    assert!(
        text.contains("1 KiB") && text.contains("t_embedder.mlp.0."),
        "{text}"
    );

    // Forward: loaded without a limit, then run under one that its activations exceed.
    set_max_tensor_bytes::<B>(&device, u64::MAX);
    let model = ZImageTransformer2DModel::<B>::from_folder(
        transformer_dir.join("transformer"),
        &device,
        DType::F32,
    )
    .expect("load");
    let case = Case::open(transformer_dir.join("cases/batch1.safetensors"));
    let latent: Tensor<B, 4> = case.tensor_on::<B, 4>("latent.0", &device);
    let caption: Tensor<B, 2> = case.tensor_on::<B, 2>("caption.0", &device);
    let (t, _) = case.values("timesteps");
    model
        .forward(&[latent.clone()], &t, &[caption.clone()])
        .expect("unlimited");
    set_max_tensor_bytes::<B>(&device, 4096);
    let err = model
        .forward(&[latent], &t, &[caption])
        .expect_err("activation over the limit");
    println!("{err}");
    assert!(matches!(err, TransformerError::TooLarge(_)), "{err}");
    assert!(err.to_string().contains("feed-forward"), "{err}");

    // VAE: a limit just under the whole decode's largest activation.
    set_max_tensor_bytes::<B>(&device, u64::MAX);
    let vae_dir = fixtures().join("vae/a");
    let vae =
        AutoencoderKL::<B>::from_folder(vae_dir.join("vae"), &device, DType::F32).expect("load");
    let case = Case::open(vae_dir.join("cases/square.safetensors"));
    let latents: Tensor<B, 4> = case.tensor_on::<B, 4>("latents", &device);
    let [batch, _, h, w] = latents.dims();
    let f = vae.downscale_factor();
    assert_eq!(
        vae.tiling_to_fit(batch, h * f, w * f, true).expect("fits"),
        None
    );
    let whole: usize = vae
        .config()
        .largest_activation(batch, h * f, w * f, true)
        .iter()
        .product();
    set_max_tensor_bytes::<B>(&device, whole as u64 * 4 - 1);
    let err = vae.decode(latents.clone()).expect_err("over the limit");
    println!("{err}");
    assert!(matches!(err, VaeError::TooLarge(_)), "{err}");
    let tiling = vae
        .tiling_to_fit(batch, h * f, w * f, true)
        .expect("a tile fits")
        .expect("tiling needed");
    assert!(tiling.tile_sample_min_size < h * f, "{tiling:?}");
    let decoded = vae.decode_tiled(latents.clone(), &tiling).expect("tiled");
    assert_eq!(decoded.dims(), [batch, 3, h * f, w * f]);
    // The encoder is checked the same way.
    assert!(matches!(
        vae.encode(case.tensor_on::<B, 4>("image", &device)),
        Err(VaeError::TooLarge(_))
    ));
    // Nothing fits in 16 bytes.
    set_max_tensor_bytes::<B>(&device, 16);
    assert!(matches!(
        vae.tiling_to_fit(batch, h * f, w * f, true),
        Err(VaeError::TooLarge(_))
    ));
}
