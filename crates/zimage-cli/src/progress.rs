//! Progress bars for the pipeline's events.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use zimage_nn::ZBackend;
use zimage_pipeline::{Event, Stage};

/// A spinner per stage and a bar over the denoising steps, on stderr, and one line with the time
/// of each stage that computes (the bars vanish when stderr is not a terminal; the lines stay).
pub struct Progress {
    quiet: bool,
    spinner: Option<ProgressBar>,
    steps: Option<ProgressBar>,
    /// The computing stage under way, when it began, and its steps so far.
    running: Option<(Stage, Instant, usize)>,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            spinner: None,
            steps: None,
            running: None,
        }
    }

    /// Ends the stage under way, printing its time; call once the generation has returned.
    pub fn done(&mut self) {
        if let Some((stage, started, steps)) = self.running.take() {
            let seconds = started.elapsed().as_secs_f64();
            if stage == Stage::Denoising && steps > 0 {
                eprintln!(
                    "denoising took {seconds:.1} s ({steps} steps, {:.2} s/step)",
                    seconds / steps as f64
                );
            } else {
                eprintln!("{} took {seconds:.1} s", stage.describe());
            }
        }
    }

    fn begin(&mut self, stage: Stage) {
        self.done();
        let computes = matches!(
            stage,
            Stage::EncodingPrompts | Stage::Denoising | Stage::EncodingImage | Stage::Decoding
        );
        if computes {
            self.running = Some((stage, Instant::now(), 0));
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.spinner.take() {
            bar.finish_and_clear();
        }
    }

    pub fn handle<B: ZBackend>(&mut self, event: Event<'_, B>) -> ControlFlow<()> {
        if self.quiet {
            return ControlFlow::Continue(());
        }
        if let Event::Stage(stage) = &event {
            self.begin(*stage);
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
            Event::Loaded {
                stage,
                elapsed,
                bytes,
            } => {
                self.finish();
                let seconds = elapsed.as_secs_f64();
                eprintln!(
                    "{} took {seconds:.1} s ({:.2} GB, {:.2} GB/s)",
                    stage.describe(),
                    bytes as f64 / 1e9,
                    bytes as f64 / 1e9 / seconds.max(1e-9)
                );
            }
            Event::Step { step, total, .. } => {
                if let Some((Stage::Denoising, _, steps)) = &mut self.running {
                    *steps = step;
                }
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
