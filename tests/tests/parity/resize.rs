//! Pillow's Lanczos resize and `convert("L")`, which diffusers applies to every input image, control
//! image and mask of another size than the output: byte for byte against Pillow
//! (`tests/fixtures/make_resize_fixtures.py`).

use zimage_test_support::fixtures;

use serde::Deserialize;
use zimage_pipeline::resize::{luma, resize_lanczos, to_gray};

#[derive(Deserialize)]
struct Manifest {
    cases: Vec<ResizeCase>,
}

#[derive(Deserialize)]
struct ResizeCase {
    source: String,
    width: u32,
    height: u32,
    resized: String,
    luma: Option<String>,
}

fn open(name: &str) -> image::DynamicImage {
    image::open(fixtures().join("resize").join(name)).unwrap()
}

#[test]
fn lanczos_and_grey_are_pillows_byte_for_byte() {
    let text = std::fs::read_to_string(fixtures().join("resize/cases.json")).unwrap();
    let manifest: Manifest = serde_json::from_str(&text).unwrap();
    assert!(manifest.cases.len() >= 20);
    let mut differing = Vec::new();
    for case in &manifest.cases {
        let source = open(&format!("{}.png", case.source));
        let expected = open(&case.resized);
        let what = format!("{} -> {}x{}", case.source, case.width, case.height);
        let same = match &source {
            image::DynamicImage::ImageLuma8(gray) => {
                resize_lanczos(gray, case.width, case.height) == expected.to_luma8()
            }
            other => {
                let resized = resize_lanczos(&other.to_rgb8(), case.width, case.height);
                if let Some(l) = &case.luma {
                    assert_eq!(luma(&resized), open(l).to_luma8(), "{what}: convert(\"L\")");
                    assert_eq!(
                        to_gray(&image::DynamicImage::ImageRgb8(resized.clone())),
                        open(l).to_luma8()
                    );
                }
                resized == expected.to_rgb8()
            }
        };
        if !same {
            differing.push(what);
        }
    }
    assert!(differing.is_empty(), "differ from Pillow: {differing:?}");
}

/// The `image` crate's own Lanczos filter is not Pillow's: the fixtures can tell them apart, so the
/// test above would catch a fall back to it.
#[test]
fn the_image_crates_lanczos_differs_from_pillows() {
    let source = open("noise_rgb.png").to_rgb8();
    let expected = open("noise_rgb_64x48.png").to_rgb8();
    let theirs = image::imageops::resize(&source, 64, 48, image::imageops::FilterType::Lanczos3);
    assert_ne!(theirs, expected);
    assert_eq!(resize_lanczos(&source, 64, 48), expected);
}
