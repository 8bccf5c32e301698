//! What a run shows while it works: a live display on a terminal, plain lines otherwise.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::outcome::{RunSummary, StageReport, StageStatus};
use crate::plan::Plan;

/// Receives scheduler events. Implementations write to stderr only: stdout is for `--json`.
pub trait Display {
    fn begin(&mut self, plan: &Plan);
    fn started(&mut self, plan: &Plan, node: usize, reasons: &[String]);
    fn finished(&mut self, plan: &Plan, report: &StageReport);
    fn failed(&mut self, plan: &Plan, report: &StageReport, log_tail: &str);
    fn message(&mut self, text: &str);
    /// Called about every 100 ms with the op-reported progress of running stages.
    fn tick(&mut self, plan: &Plan, progress: &HashMap<usize, String>);
    fn end(&mut self, plan: &Plan, summary: &RunSummary);
}

/// Nothing at all (library callers, tests).
pub struct Silent;

impl Display for Silent {
    fn begin(&mut self, _: &Plan) {}
    fn started(&mut self, _: &Plan, _: usize, _: &[String]) {}
    fn finished(&mut self, _: &Plan, _: &StageReport) {}
    fn failed(&mut self, _: &Plan, _: &StageReport, _: &str) {}
    fn message(&mut self, _: &str) {}
    fn tick(&mut self, _: &Plan, _: &HashMap<usize, String>) {}
    fn end(&mut self, _: &Plan, _: &RunSummary) {}
}

/// Counts shared by both displays.
#[derive(Default)]
struct Counts {
    cached: usize,
    ran: usize,
    failed: usize,
    skipped: usize,
    running: usize,
    total: usize,
}

impl Counts {
    fn line(&self) -> String {
        let pending = self
            .total
            .saturating_sub(self.cached + self.ran + self.failed + self.skipped + self.running);
        format!(
            "cached {} | ran {} | running {} | failed {} | skipped {} | pending {}",
            self.cached, self.ran, self.running, self.failed, self.skipped, pending
        )
    }
    fn record(&mut self, status: StageStatus) {
        match status {
            StageStatus::Cached => self.cached += 1,
            StageStatus::Ran => {
                self.ran += 1;
                self.running = self.running.saturating_sub(1)
            }
            StageStatus::Failed => self.failed += 1,
            StageStatus::Skipped => self.skipped += 1,
        }
    }
}

fn failure_text(plan_name: &str, report: &StageReport, log_tail: &str) -> String {
    let mut text = format!(
        "FAILED {plan_name}: {}",
        report.message.as_deref().unwrap_or("failed")
    );
    if !log_tail.trim().is_empty() {
        text.push_str("\n  --- last lines of its log ---");
        for line in log_tail.lines() {
            text.push_str("\n  ");
            text.push_str(line);
        }
    }
    text
}

fn summary_line(summary: &RunSummary) -> String {
    format!(
        "{} stages: {} ran, {} cached, {} failed, {} skipped in {:.2}s{}",
        summary.reports.len(),
        summary.count(StageStatus::Ran),
        summary.count(StageStatus::Cached),
        summary.count(StageStatus::Failed),
        summary.count(StageStatus::Skipped),
        summary.wall_s,
        if summary.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    )
}

/// One line per event, for logs and CI. Cache hits are summarised, not listed, past 50.
pub struct Plain {
    counts: Counts,
    last_progress: HashMap<usize, (String, Instant)>,
    verbose_hits: bool,
}

impl Plain {
    pub fn new() -> Self {
        Self {
            counts: Counts::default(),
            last_progress: HashMap::new(),
            verbose_hits: true,
        }
    }
}

impl Default for Plain {
    fn default() -> Self {
        Self::new()
    }
}

fn err_line(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{text}");
}

impl Display for Plain {
    fn begin(&mut self, plan: &Plan) {
        self.counts.total = plan.nodes.len();
        self.verbose_hits = plan.nodes.len() <= 50;
    }
    fn started(&mut self, plan: &Plan, node: usize, reasons: &[String]) {
        self.counts.running += 1;
        err_line(&format!(
            "run    {} ({})",
            plan.nodes[node].name,
            reasons.join("; ")
        ));
    }
    fn finished(&mut self, plan: &Plan, report: &StageReport) {
        self.counts.record(report.status);
        let name = &plan.nodes[report.node].name;
        match report.status {
            StageStatus::Cached if self.verbose_hits => err_line(&format!("cached {name}")),
            StageStatus::Ran => err_line(&format!("done   {name} ({:.2}s)", report.duration_s)),
            StageStatus::Skipped => err_line(&format!(
                "skip   {name}: {}",
                report.message.as_deref().unwrap_or("skipped")
            )),
            _ => {}
        }
    }
    fn failed(&mut self, plan: &Plan, report: &StageReport, log_tail: &str) {
        self.counts.failed += 1;
        self.counts.running = self.counts.running.saturating_sub(1);
        err_line(&failure_text(
            &plan.nodes[report.node].name,
            report,
            log_tail,
        ));
    }
    fn message(&mut self, text: &str) {
        err_line(text);
    }
    fn tick(&mut self, plan: &Plan, progress: &HashMap<usize, String>) {
        for (node, text) in progress {
            let stale = self
                .last_progress
                .get(node)
                .is_none_or(|(t, at)| t != text && at.elapsed() > Duration::from_secs(2));
            if stale {
                err_line(&format!("       {}: {text}", plan.nodes[*node].name));
                self.last_progress
                    .insert(*node, (text.clone(), Instant::now()));
            }
        }
    }
    fn end(&mut self, _plan: &Plan, summary: &RunSummary) {
        err_line(&summary_line(summary));
    }
}

/// The terminal display: a counts line and one spinner per running stage.
pub struct Live {
    multi: MultiProgress,
    header: ProgressBar,
    bars: HashMap<usize, ProgressBar>,
    counts: Counts,
}

impl Live {
    pub fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let header = multi.add(ProgressBar::new_spinner());
        header.set_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        Self {
            multi,
            header,
            bars: HashMap::new(),
            counts: Counts::default(),
        }
    }
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

impl Display for Live {
    fn begin(&mut self, plan: &Plan) {
        self.counts.total = plan.nodes.len();
        self.header.set_message(self.counts.line());
    }
    fn started(&mut self, plan: &Plan, node: usize, _reasons: &[String]) {
        self.counts.running += 1;
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("  {spinner} {prefix} [{elapsed}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(plan.nodes[node].name.clone());
        bar.enable_steady_tick(Duration::from_millis(120));
        self.bars.insert(node, bar);
        self.header.set_message(self.counts.line());
    }
    fn finished(&mut self, plan: &Plan, report: &StageReport) {
        self.counts.record(report.status);
        if let Some(bar) = self.bars.remove(&report.node) {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
        if report.status == StageStatus::Ran {
            let _ = self.multi.println(format!(
                "done   {} ({:.2}s)",
                plan.nodes[report.node].name, report.duration_s
            ));
        }
        self.header.set_message(self.counts.line());
    }
    fn failed(&mut self, plan: &Plan, report: &StageReport, log_tail: &str) {
        self.counts.failed += 1;
        self.counts.running = self.counts.running.saturating_sub(1);
        if let Some(bar) = self.bars.remove(&report.node) {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
        let _ = self.multi.println(failure_text(
            &plan.nodes[report.node].name,
            report,
            log_tail,
        ));
        self.header.set_message(self.counts.line());
    }
    fn message(&mut self, text: &str) {
        let _ = self.multi.println(text);
    }
    fn tick(&mut self, _plan: &Plan, progress: &HashMap<usize, String>) {
        for (node, text) in progress {
            if let Some(bar) = self.bars.get(node) {
                bar.set_message(text.clone());
            }
        }
        self.header.tick();
    }
    fn end(&mut self, _plan: &Plan, summary: &RunSummary) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
        }
        self.header.finish_and_clear();
        let _ = self.multi.clear();
        err_line(&summary_line(summary));
    }
}
