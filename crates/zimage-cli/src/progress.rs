//! Progress bars for the pipeline's events.

use std::ops::ControlFlow;
use std::time::Duration;

use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};
use zimage_pipeline::{Event, Stage};

/// A spinner per stage and a bar over the denoising steps, on stderr.
pub struct Progress {
    quiet: bool,
    spinner: Option<ProgressBar>,
    steps: Option<ProgressBar>,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            spinner: None,
            steps: None,
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.spinner.take() {
            bar.finish_and_clear();
        }
    }

    pub fn handle<B: Backend>(&mut self, event: Event<'_, B>) -> ControlFlow<()> {
        if self.quiet {
            return ControlFlow::Continue(());
        }
        match event {
            Event::Stage(Stage::Denoising) => {
                self.finish();
            }
            Event::Stage(stage) => {
                self.finish();
                if let Some(bar) = self.steps.take() {
                    bar.finish();
                }
                let bar = ProgressBar::new_spinner().with_message(stage.describe());
                bar.enable_steady_tick(Duration::from_millis(120));
                self.spinner = Some(bar);
            }
            Event::Loaded { stage, elapsed } => {
                self.finish();
                eprintln!("{} took {:.1} s", stage.describe(), elapsed.as_secs_f64());
            }
            Event::Step { step, total, .. } => {
                let bar = self.steps.get_or_insert_with(|| {
                    let bar = ProgressBar::new(total as u64);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "denoising {bar:30} {pos}/{len} steps [{elapsed_precise}, {per_sec}]",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar
                });
                bar.set_position(step as u64);
                if step == total {
                    bar.finish();
                    self.steps = None;
                }
            }
        }
        ControlFlow::Continue(())
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
