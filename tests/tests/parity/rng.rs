//! The torch-compatible CPU generator against recorded `torch.randn` outputs
//! (`tests/fixtures/make_rng_fixtures.py`).

use zimage_test_support as common;

use common::fixtures;
use half::bf16;
use safetensors::{Dtype, SafeTensors};
use zimage_pipeline::TorchGenerator;

fn values(st: &SafeTensors, name: &str) -> Vec<f64> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture lacks {name}"));
    let data = t.data();
    match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        other => panic!("{name}: {other:?}"),
    }
}

const SEEDS: [u64; 6] = [0, 1, 42, 1234, (1 << 32) + 7, (1 << 40) + 123_456_789];
const NUMELS: [usize; 12] = [1, 2, 3, 7, 15, 16, 17, 37, 100, 1000, 4101, 2048];

/// Largest absolute difference, and how many values differ at all.
fn compare(actual: &[f64], expected: &[f64]) -> (f64, usize) {
    assert_eq!(actual.len(), expected.len());
    let diffs = actual.iter().zip(expected).map(|(a, e)| (a - e).abs());
    diffs.fold((0f64, 0), |(max, n), d| {
        (max.max(d), n + (d > 0.0) as usize)
    })
}

#[test]
fn randn_matches_torch_for_every_dtype_seed_and_size() {
    let bytes = std::fs::read(fixtures().join("rng/randn.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (mut worst_f32, mut worst_f64, mut worst_bf16, mut differing_bf16, mut total_bf16) =
        (0f64, 0f64, 0f64, 0, 0);
    for seed in SEEDS {
        for numel in NUMELS {
            let expected = values(&st, &format!("{seed}/f32/{numel}"));
            let actual: Vec<f64> = TorchGenerator::manual_seed(seed)
                .randn_f32(numel)
                .iter()
                .map(|&x| x as f64)
                .collect();
            let (max, _) = compare(&actual, &expected);
            if numel < 16 {
                assert_eq!(
                    max, 0.0,
                    "seed {seed}, {numel} f32 values must be bit-exact"
                );
            }
            worst_f32 = worst_f32.max(max);

            let expected = values(&st, &format!("{seed}/f64/{numel}"));
            let actual = TorchGenerator::manual_seed(seed).randn_f64(numel);
            worst_f64 = worst_f64.max(compare(&actual, &expected).0);

            let expected = values(&st, &format!("{seed}/bf16/{numel}"));
            let actual: Vec<f64> = TorchGenerator::manual_seed(seed)
                .randn_bf16(numel)
                .iter()
                .map(|x| x.to_f64())
                .collect();
            // bf16 tensors with a ragged last block take another path in ATen; latent noise has
            // 16 channels, so its size is always a multiple of 16.
            if numel < 16 || numel % 16 == 0 {
                let (max, n) = compare(&actual, &expected);
                worst_bf16 = worst_bf16.max(max);
                differing_bf16 += n;
                total_bf16 += numel;
            }
        }
    }
    println!("max |diff|: f32 {worst_f32:.3e}, f64 {worst_f64:.3e}, bf16 {worst_bf16:.3e} ({differing_bf16} of {total_bf16} bf16 values differ)");
    // Large f32 tensors: torch's vectorised log/sincos may differ from libm in the last ulp.
    assert!(worst_f32 <= 1e-6, "f32 {worst_f32}");
    assert!(worst_f64 <= 1e-12, "f64 {worst_f64}");
    // bf16 rounding of those same last-ulp differences: at most one bf16 step, rarely.
    assert!(
        worst_bf16 <= 0.02 && differing_bf16 * 1000 <= total_bf16,
        "bf16 {worst_bf16}, {differing_bf16} values"
    );
}

#[test]
fn cached_normal_carries_over_between_calls() {
    let bytes = std::fs::read(fixtures().join("rng/randn.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for seed in &SEEDS[..3] {
        let mut g = TorchGenerator::manual_seed(*seed);
        for (k, numel) in [3usize, 5, 20, 1, 2, 33, 7].into_iter().enumerate() {
            let expected = values(&st, &format!("sequence/{seed}/{k}"));
            let actual: Vec<f64> = g.randn_f32(numel).iter().map(|&x| x as f64).collect();
            let (max, _) = compare(&actual, &expected);
            assert!(max <= 1e-6, "seed {seed} call {k}: {max}");
        }
    }
}
