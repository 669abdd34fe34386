//! FlowMatchEulerDiscreteScheduler against diffusers 0.42.1
//! (`tests/fixtures/make_scheduler_fixtures.py`).

use zimage_test_support as common;

use burn::tensor::Tensor;
use common::{errors, fixtures, to_vec, Case, B};
use serde::Deserialize;
use zimage_scheduler::{FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteSchedulerConfig};

#[derive(Deserialize)]
struct Table {
    label: String,
    config: serde_json::Value,
    steps: usize,
    sigmas_in: Option<Vec<f64>>,
    mu: Option<f64>,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
}

/// Distance in float32 ulps.
fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn tables_match_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("scheduler/tables.json")).unwrap();
    let tables: Vec<Table> = serde_json::from_str(&text).unwrap();
    assert!(tables.len() > 150);
    let (mut exact, mut worst) = (0usize, 0u32);
    for table in &tables {
        let config: FlowMatchEulerDiscreteSchedulerConfig =
            serde_json::from_value(table.config.clone()).expect("config");
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(config).expect("scheduler");
        let sigmas_in: Option<Vec<f32>> = table
            .sigmas_in
            .as_ref()
            .map(|s| s.iter().map(|&x| x as f32).collect());
        let steps = if sigmas_in.is_some() {
            None
        } else {
            Some(table.steps)
        };
        scheduler
            .set_timesteps(steps, sigmas_in.as_deref(), table.mu)
            .expect("set_timesteps");
        let got: Vec<f32> = scheduler
            .sigmas()
            .iter()
            .chain(scheduler.timesteps())
            .copied()
            .collect();
        let want: Vec<f32> = table
            .sigmas
            .iter()
            .chain(&table.timesteps)
            .map(|&x| x as f32)
            .collect();
        assert_eq!(got.len(), want.len(), "{} N={}", table.label, table.steps);
        let max = got
            .iter()
            .zip(&want)
            .map(|(&a, &b)| ulps(a, b))
            .max()
            .unwrap_or(0);
        // Bit-exact: the same float32 operations in the same order as diffusers.
        assert!(
            max == 0,
            "{} N={} {:?}: {max} ulps\n got {got:?}\nwant {want:?}",
            table.label,
            table.steps,
            table.config
        );
        exact += (max == 0) as usize;
        worst = worst.max(max);
    }
    println!(
        "{exact} of {} schedules bit-exact, worst {worst} ulp",
        tables.len()
    );
}

#[test]
fn z_image_default_turbo_schedule() {
    let mut scheduler = FlowMatchEulerDiscreteScheduler::new(
        FlowMatchEulerDiscreteSchedulerConfig::z_image_turbo(),
    )
    .unwrap();
    scheduler
        .set_timesteps(None, Some(&zimage_scheduler::z_image_sigmas(8)), Some(1.15))
        .unwrap();
    let expected = [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0];
    for (got, want) in scheduler.sigmas().iter().zip(expected) {
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}

#[test]
fn steps_and_scale_noise_match_diffusers() {
    let device = Default::default();
    let case = Case::open(fixtures().join("scheduler/steps.safetensors"));
    let mut scheduler = FlowMatchEulerDiscreteScheduler::new(
        FlowMatchEulerDiscreteSchedulerConfig::z_image_turbo(),
    )
    .unwrap();
    scheduler
        .set_timesteps(None, Some(&zimage_scheduler::z_image_sigmas(8)), None)
        .unwrap();
    scheduler.set_begin_index(3);
    let sample: Tensor<B, 4> = case.tensor("sample", &device);
    let noise: Tensor<B, 4> = case.tensor("noise", &device);
    let check = |name: &str, t: Tensor<B, 4>| {
        let (rel, max) = errors(&to_vec(t), &case.values(name).0);
        assert!(max == 0.0, "{name}: rel {rel:.3e}, max {max:.3e}");
    };
    let mut x = scheduler.scale_noise(sample.clone(), noise.clone());
    check("scaled_at_begin", x.clone());
    for i in 0..3 {
        x = scheduler
            .step(case.tensor(&format!("model_output.{i}"), &device), x)
            .unwrap();
        check(&format!("step.{i}"), x.clone());
        check(
            &format!("scaled.{i}"),
            scheduler.scale_noise(sample.clone(), noise.clone()),
        );
    }
}

#[test]
fn bad_configs_and_calls_are_errors() {
    assert!(FlowMatchEulerDiscreteSchedulerConfig::from_json(
        r#"{"use_karras_sigmas": true, "use_exponential_sigmas": true}"#
    )
    .is_err());
    assert!(
        FlowMatchEulerDiscreteSchedulerConfig::from_json(r#"{"use_beta_sigmas": true}"#).is_err()
    );
    assert!(FlowMatchEulerDiscreteSchedulerConfig::from_json(r#"{"shift": "three"}"#).is_err());
    let mut dynamic = FlowMatchEulerDiscreteScheduler::new(FlowMatchEulerDiscreteSchedulerConfig {
        use_dynamic_shifting: true,
        ..Default::default()
    })
    .unwrap();
    assert!(
        dynamic.set_timesteps(Some(8), None, None).is_err(),
        "mu is required"
    );
    let mut s = FlowMatchEulerDiscreteScheduler::new(Default::default()).unwrap();
    assert!(s.set_timesteps(Some(3), Some(&[1.0, 0.5]), None).is_err());
    assert!(s.set_timesteps(Some(0), None, None).is_err());
    s.set_timesteps(Some(1), None, None).unwrap();
    let x = Tensor::<B, 1>::zeros([4], &Default::default());
    let x = s.step(x.clone(), x).unwrap();
    assert!(s.step(x.clone(), x).is_err(), "stepping past the end");
}
