//! The metric toolkit every concern registers its own series with: closed
//! label sets, counter families indexed by label, one-line registration,
//! and the text encoding `/metrics` serves.
//!
//! A leaf: it knows no concern of wsgate. Each concern (admission, the
//! splice, sessions, keys, the fleet, the drain, reloads, readiness) owns
//! its series beside its code and registers them here, each name written
//! once; `docs/metrics.md` lists them all (a test checks it against a
//! fully configured instance).
//!
//! Series with labels are created at start-up (at 0) so a healthy pod
//! never shows "no data", and labels come only from closed enums, never
//! from paths, key values or addresses, so cardinality is bounded. The
//! registry is owned, not the global default, so several proxies can run
//! in one test binary without colliding.

use std::marker::PhantomData;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// A closed set of label values: the only way a label reaches a series, so
/// a misspelt label cannot compile.
pub(crate) trait Label: Copy + 'static {
    /// Every value, each at the position [`Label::index`] gives it.
    const ALL: &'static [Self];
    /// The label value on the wire.
    fn label(self) -> &'static str;
    /// Position in [`Label::ALL`].
    fn index(self) -> usize;
}

/// Declares a closed label set: the enum, its `ALL` list (in declaration
/// order) and each value's text, written once.
///
/// ```ignore
/// labels! {
///     /// How a reload went.
///     pub(crate) enum ReloadResult {
///         /// Applied.
///         Success => "success",
///         /// Refused.
///         Failure => "failure",
///     }
/// }
/// ```
macro_rules! labels {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $crate::metrics::Label for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}
pub(crate) use labels;

/// One counter handle per label value, looked up once at start-up:
/// counting is then an index and an atomic add, with no label hashing on
/// the hot path.
#[derive(Debug, Clone)]
pub(crate) struct Family<L> {
    /// `None` for a value whose series is deliberately not exported.
    handles: Box<[Option<IntCounter>]>,
    label: PhantomData<L>,
}

impl<L: Label> Family<L> {
    /// Handles for the values `keep` accepts; the others are not exported.
    fn of(vec: &IntCounterVec, keep: impl Fn(L) -> bool) -> Self {
        Family {
            handles: L::ALL
                .iter()
                .map(|l| keep(*l).then(|| vec.with_label_values(&[l.label()])))
                .collect(),
            label: PhantomData,
        }
    }

    /// Counts one event labelled `l`.
    pub(crate) fn inc(&self, l: L) {
        match self.handles.get(l.index()) {
            Some(Some(counter)) => counter.inc(),
            _ => debug_assert!(false, "no series for {}", l.label()),
        }
    }
}

/// Registers metrics on one registry, one call per metric: the call names
/// it, describes it and hands back its handle.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Registrar<'a> {
    registry: &'a Registry,
}

impl<'a> Registrar<'a> {
    /// Registers on `registry`.
    pub(crate) fn new(registry: &'a Registry) -> Self {
        Registrar { registry }
    }

    fn add<C: Collector + Clone + 'static>(&self, c: C) -> prometheus::Result<C> {
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }

    /// A counter without labels.
    ///
    /// # Errors
    /// The name is taken on this registry, or is not a valid metric name.
    pub(crate) fn counter(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.add(IntCounter::new(name, help)?)
    }

    /// A gauge without labels.
    ///
    /// # Errors
    /// As [`Registrar::counter`].
    pub(crate) fn gauge(&self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        self.add(IntGauge::new(name, help)?)
    }

    /// A floating-point gauge without labels.
    ///
    /// # Errors
    /// As [`Registrar::counter`].
    pub(crate) fn float_gauge(&self, name: &str, help: &str) -> prometheus::Result<Gauge> {
        self.add(Gauge::new(name, help)?)
    }

    /// A counter per value of `L` under the label `label`, each at 0.
    ///
    /// # Errors
    /// As [`Registrar::counter`].
    pub(crate) fn family<L: Label>(
        &self,
        name: &str,
        help: &str,
        label: &str,
    ) -> prometheus::Result<Family<L>> {
        self.family_of(name, help, label, |_| true)
    }

    /// Like [`Registrar::family`], exporting only the values `keep` accepts.
    ///
    /// # Errors
    /// As [`Registrar::counter`].
    pub(crate) fn family_of<L: Label>(
        &self,
        name: &str,
        help: &str,
        label: &str,
        keep: impl Fn(L) -> bool,
    ) -> prometheus::Result<Family<L>> {
        let vec = self.counter_vec(name, help, &[label])?;
        Ok(Family::of(&vec, keep))
    }

    /// A counter with free labels (their values still come from closed sets).
    ///
    /// # Errors
    /// As [`Registrar::counter`].
    pub(crate) fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    /// A gauge with labels.
    ///
    /// # Errors
    /// As [`Registrar::counter`].
    pub(crate) fn gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntGaugeVec> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    /// A floating-point gauge with labels.
    ///
    /// # Errors
    /// As [`Registrar::counter`].
    pub(crate) fn float_gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<GaugeVec> {
        self.add(GaugeVec::new(Opts::new(name, help), labels)?)
    }

    /// A histogram with `buckets` (upper bounds, seconds).
    ///
    /// # Errors
    /// As [`Registrar::counter`].
    pub(crate) fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
    ) -> prometheus::Result<Histogram> {
        self.add(Histogram::with_opts(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        )?)
    }

    /// A histogram with labels.
    ///
    /// # Errors
    /// As [`Registrar::counter`].
    pub(crate) fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> prometheus::Result<HistogramVec> {
        self.add(HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )?)
    }

    /// `wsgate_build_info{version}` (always 1) and the prometheus crate's
    /// process collector (`process_*`: memory, descriptors, CPU).
    ///
    /// # Errors
    /// As [`Registrar::counter`].
    pub(crate) fn process(&self) -> prometheus::Result<()> {
        let build = self.gauge_vec(
            "wsgate_build_info",
            "Build information; always 1",
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        self.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
    }
}

/// Encodes everything in `registry` in the Prometheus text format.
pub(crate) fn encode(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 * 1024);
    // Encoding into a Vec cannot fail on IO; a collector error would only drop
    // that family, which is better than failing the whole scrape.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    labels! {
        /// A test set.
        enum Colour {
            /// R.
            Red => "red",
            /// G.
            Green => "green",
        }
    }

    #[test]
    fn a_family_exports_every_value_at_zero_and_counts_by_index() {
        let r = Registry::new();
        let f: Family<Colour> = Registrar::new(&r)
            .family("t_total", "t", "colour")
            .expect("register");
        f.inc(Colour::Green);
        let text = String::from_utf8(encode(&r)).expect("utf8");
        assert!(text.contains("t_total{colour=\"red\"} 0"), "{text}");
        assert!(text.contains("t_total{colour=\"green\"} 1"), "{text}");
        assert_eq!(Colour::ALL, &[Colour::Red, Colour::Green]);
    }

    #[test]
    fn a_name_registered_twice_is_an_error() {
        let r = Registry::new();
        let reg = Registrar::new(&r);
        reg.counter("twice_total", "t").expect("first");
        assert!(reg.counter("twice_total", "t").is_err());
    }
}
