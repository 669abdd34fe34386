//! The VAE's checkpoint mapping against the full tensor list of the published Z-Image VAE, in
//! diffusers and BFL (`ae.safetensors`) naming (`tests/fixtures/vae/published_names.json`, whose
//! BFL names the fixture script checks against diffusers' `convert_ldm_vae_checkpoint`).

use zimage_test_support as common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{fixtures, B};
use serde::Deserialize;
use zimage_nn::weights::expected_tensors;
use zimage_nn::KeyMapping;
use zimage_vae::checkpoint::{detect_names, diffusers_name, map_key};
use zimage_vae::{AutoencoderKL, AutoencoderKLConfig, Naming, ProjectionLayout};

#[derive(Deserialize)]
struct Row {
    diffusers: String,
    shape: Vec<usize>,
    bfl: String,
    bfl_shape: Vec<usize>,
}

fn published() -> Vec<Row> {
    let path = fixtures().join("vae/published_names.json");
    let text = std::fs::read_to_string(&path).expect("published_names.json");
    serde_json::from_str(&text).expect("rows")
}

/// The (path, shape) list the model asks for with the published config.
fn expected(layout: ProjectionLayout) -> BTreeMap<String, Vec<usize>> {
    let config = AutoencoderKLConfig::z_image();
    expected_tensors::<B, _>(&Default::default(), |w| {
        AutoencoderKL::build_with_layout(&config, w, layout)
    })
    .expect("dry run")
    .into_iter()
    .collect()
}

/// Maps every `(name, shape)` with the detected format, as loading does.
fn mapped(names: &[(String, Vec<usize>)]) -> (BTreeMap<String, Vec<usize>>, ProjectionLayout) {
    let config = AutoencoderKLConfig::z_image();
    let shapes: BTreeMap<&str, Vec<usize>> =
        names.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    let list: Vec<&str> = shapes.keys().copied().collect();
    let format =
        detect_names(&list, |n| shapes.get(n).cloned(), Path::new("published")).expect("format");
    let mut out = BTreeMap::new();
    for (name, shape) in names {
        match map_key(&format, &config, name, shape) {
            KeyMapping::To(path) => assert!(out.insert(path, shape.clone()).is_none(), "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    (out, format.attention)
}

#[test]
fn published_diffusers_names_are_the_module_paths() {
    let rows = published();
    assert_eq!(rows.len(), 244);
    let names: Vec<(String, Vec<usize>)> = rows
        .iter()
        .map(|r| (r.diffusers.clone(), r.shape.clone()))
        .collect();
    let (mapped, layout) = mapped(&names);
    assert_eq!(layout, ProjectionLayout::Linear);
    assert_eq!(mapped, expected(ProjectionLayout::Linear));
}

#[test]
fn published_bfl_names_map_to_the_module_paths() {
    let rows = published();
    let names: Vec<(String, Vec<usize>)> = rows
        .iter()
        .map(|r| (r.bfl.clone(), r.bfl_shape.clone()))
        .collect();
    // BFL stores the attention projections as 1x1 convs.
    assert!(rows
        .iter()
        .any(|r| r.bfl == "encoder.mid.attn_1.q.weight" && r.bfl_shape == [512, 512, 1, 1]));
    for row in &rows {
        let format = zimage_vae::CheckpointFormat {
            naming: Naming::Bfl,
            prefix: String::new(),
            attention: ProjectionLayout::Conv1x1,
        };
        assert_eq!(
            diffusers_name(&format, 4, &row.bfl).as_deref(),
            Some(row.diffusers.as_str()),
            "{}",
            row.bfl
        );
    }
    let (mapped, layout) = mapped(&names);
    assert_eq!(layout, ProjectionLayout::Conv1x1);
    assert_eq!(mapped, expected(ProjectionLayout::Conv1x1));
    // The decoder's order is reversed: BFL up.0 is the last, full-resolution diffusers block.
    assert!(rows
        .iter()
        .any(|r| r.bfl == "decoder.up.0.block.0.nin_shortcut.weight"
            && r.diffusers == "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"));
}

#[test]
fn published_parameter_count() {
    let total: usize = expected(ProjectionLayout::Linear)
        .values()
        .map(|s| s.iter().product::<usize>())
        .sum();
    // spec §5: 83,819,683 parameters in 244 tensors
    assert_eq!(total, 83_819_683);
}
