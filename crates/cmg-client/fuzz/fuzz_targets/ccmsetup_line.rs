//! Any install command line, split as a shell would split it on white space: the ccmsetup
//! parser accepts it or says what is wrong, and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &str| {
    let args: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    let _ = cmg_client::InstallOptions::parse(&args);
});
