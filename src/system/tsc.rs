//! The host's TSC rate, for the guest's `tsc_early_khz=`. Under QEMU TCG a
//! microvm guest has no HPET or PM timer to calibrate the TSC against and
//! hangs in about half the boots without it (reference/this-machine.md §2);
//! TCG's guest TSC runs at the host's rate, so the host's value is right.

use super::SystemError;

/// kHz from the first `cpu MHz : 2100.000` line, rounded to whole kHz.
pub fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim() != "cpu MHz" {
            return None;
        }
        let mhz: f64 = value.trim().parse().ok()?;
        (mhz.is_finite() && mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
    })
}

/// Reads `/proc/cpuinfo`. Note that "cpu MHz" is the current clock where
/// frequency scaling is visible to the host; on the VMs this runs on it is
/// the fixed TSC rate the host kernel detected.
pub fn host_tsc_khz() -> Result<u64, SystemError> {
    let text = std::fs::read_to_string("/proc/cpuinfo")
        .map_err(|e| SystemError::io("read", "/proc/cpuinfo", e))?;
    tsc_khz_from_cpuinfo(&text).ok_or(SystemError::NoCpuMhz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_cpu_mhz_line() {
        let text = "processor\t: 0\nmodel name\t: Intel Xeon @ 2.10GHz\ncpu MHz\t\t: 2100.000\n\nprocessor\t: 1\ncpu MHz\t\t: 1999.999\n";
        assert_eq!(tsc_khz_from_cpuinfo(text), Some(2_100_000));
        assert_eq!(
            tsc_khz_from_cpuinfo("cpu MHz : 2399.9996\n"),
            Some(2_400_000)
        );
        assert_eq!(tsc_khz_from_cpuinfo("processor : 0\n"), None);
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : fast\n"), None);
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : 0\n"), None);
    }

    #[test]
    fn this_host_has_a_rate() {
        // Every x86 Linux host the daemon supports reports it.
        if cfg!(target_arch = "x86_64") {
            assert!(host_tsc_khz().expect("cpuinfo") > 100_000);
        }
    }
}
