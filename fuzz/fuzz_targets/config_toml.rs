//! Fuzz target: the TOML files an operator writes (training plan, roster,
//! release policy).
//!
//! They reach the coordinator from disk and, for plans, over the admin API. A
//! bad file must give an error naming the key, never a panic; a file that is
//! accepted must survive `to_toml` and parse back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::config::roster::Roster;
use sangsaeng_coordinator::release::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if kind % 3 == 2 {
        if let Ok(p) = Policy::from_toml(text, "fuzz.toml") {
            let again = Policy::from_toml(&toml::to_string(&p).unwrap(), "again.toml")
                .expect("an accepted policy re-parses");
            assert_eq!(p, again);
        }
    } else if kind % 3 == 0 {
        if let Ok(plan) = TrainingPlan::from_toml(text, "fuzz.toml") {
            let again = TrainingPlan::from_toml(&plan.to_toml(), "again.toml")
                .expect("an accepted plan re-parses");
            assert_eq!(plan, again);
        }
    } else if let Ok(roster) = Roster::from_toml(text, "fuzz.toml") {
        let again = Roster::from_toml(&roster.to_toml(), "again.toml")
            .expect("an accepted roster re-parses");
        assert_eq!(roster, again);
    }
});
