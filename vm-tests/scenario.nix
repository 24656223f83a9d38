# The shared NixOS VM test: one instance of a Nix-built busybox image that
# prints "COUNTER n" once a second, driven through its whole life by NixOS
# configuration switches, on the hypervisor given:
#
#   boot -> Running (the counter prints)
#   specialisation "standby" -> Standby (snapshot on disk, no VMM process)
#   back to the base configuration -> Running, restored: the counter
#     continues where it stopped instead of starting again at 1
#   systemctl restart hypeman -> the same VMM pid (the new daemon adopts it)
#   specialisation "removed" -> the instance and its data are deleted
#
# The test VM needs nested KVM: the builder needs the `kvm` and `nixos-test`
# system features and its CPU's kvm_intel/kvm_amd `nested=1`. The image, the
# machine's base configuration and the Python helpers are in common.nix.
{
  pkgs,
  hypervisor,
  package ? null,
}:

let
  common = import ./common.nix { inherit pkgs hypervisor package; };
in
{
  name = "hypeman-${hypervisor}";

  meta.timeout = 1800;

  nodes.machine =
    { lib, ... }:
    {
      imports = [ common.machine ];

      services.hypeman.instances.counter = {
        image = "oci-archive:${common.image}:latest";
        inherit hypervisor;
        vcpus = 1;
        memory = "256MiB";
      };

      # Configuration changes are tested the way users make them: a switch.
      # Both inherit everything above and change one thing.
      specialisation.standby.configuration = {
        services.hypeman.instances.counter.state = lib.mkForce "standby";
      };
      specialisation.removed.configuration = {
        services.hypeman.instances = lib.mkForce { };
      };
    };

  testScript =
    { nodes, ... }:
    let
      toplevel = nodes.machine.system.build.toplevel;
    in
    ''
      ${common.pythonHelpers}

      BASE = "${toplevel}/bin/switch-to-configuration test"
      STANDBY = "${toplevel}/specialisation/standby/bin/switch-to-configuration test"
      REMOVED = "${toplevel}/specialisation/removed/bin/switch-to-configuration test"


      def counters():
          """Every COUNTER value in the instance's console log, in order."""
          return [int(n) for n in re.findall(r"COUNTER (\d+)", app_log("counter"))]


      start_all()
      machine.wait_for_unit("hypeman.service")
      machine.succeed("test -c /dev/kvm")  # no nested KVM: nothing below can work

      with subtest("the generated configuration is what the daemon reads"):
          machine.succeed("hypeman validate")
          machine.succeed("test -e /etc/hypeman/instances/counter.toml")

      with subtest("the service runs sandboxed (nixos-module/hardening.nix)"):
          report = machine.succeed("systemd-analyze security hypeman.service --no-pager")
          print(report)
          score = float(re.search(r"Overall exposure level for hypeman.service: ([0-9.]+)", report).group(1))
          # The bound README records; scripts/unit-security.sh scores the
          # same settings offline.
          assert score <= 4.5, f"exposure {score} is above 4.5"

      with subtest("the instance boots and its counter runs"):
          machine.succeed("hypeman wait counter --state Running --timeout 300s")
          machine.wait_until_succeeds("hypeman logs counter | grep -q 'COUNTER 3'", timeout=120)
          assert len(vmm_pids()) == 1, f"expected one VMM, found {vmm_pids()}"

      with subtest("the VMM runs as its own user, sandboxed (issue 11)"):
          pid = vmm_pids()[0]
          proc = machine.succeed(f"cat /proc/{pid}/status")
          uid = int(re.search(r"^Uid:\s+(\d+)", proc, re.M).group(1))
          assert 70000 <= uid <= 70999, f"VMM uid {uid}, expected one of [vmm] uid_range"
          assert re.search(r"^Seccomp:\s+2", proc, re.M), f"no seccomp filter:\n{proc}"
          assert re.search(r"^CapEff:\s+0+$", proc, re.M), f"the VMM has capabilities:\n{proc}"
          mode = machine.succeed("stat -c '%a %g' /var/lib/hypeman").split()
          assert mode == ["710", "69999"], f"data dir {mode}"

      with subtest("standby: a snapshot on disk and no VMM"):
          machine.succeed(STANDBY)
          machine.succeed("hypeman wait counter --state Standby --timeout 180s")
          machine.fail(f"pgrep -f '{VMM}'")
          assert status("counter")["has_snapshot"], status("counter")
          before = counters()
          last_before = before[-1]
          machine.log(f"last counter before standby: {last_before}")

      with subtest("running again: restored, the counter continues"):
          machine.succeed(BASE)
          machine.succeed("hypeman wait counter --state Running --timeout 180s")

          def printed_after_restore(_):
              now = counters()
              # The console log may have been appended to or started afresh.
              new = now[len(before):] if now[: len(before)] == before else now
              return len(new) >= 2

          retry(printed_after_restore, timeout=120)
          now = counters()
          new = now[len(before):] if now[: len(before)] == before else now
          assert new[0] > last_before, (
              f"counter restarted: {last_before} before standby, {new[0]} after"
              " (a cold boot, not a restore)"
          )

      with subtest("restarting the daemon adopts the running VMM"):
          pid = status("counter")["pid"]
          assert pid, status("counter")
          machine.succeed("systemctl restart hypeman.service")
          machine.wait_for_unit("hypeman.service")
          machine.succeed("hypeman wait counter --state Running --timeout 60s")
          machine.succeed(f"kill -0 {pid}")
          assert status("counter")["pid"] == pid, f"VMM pid changed: {pid} -> {status('counter')['pid']}"
          assert vmm_pids() == [str(pid)], f"expected only VMM {pid}, found {vmm_pids()}"

      with subtest("removing the declaration deletes the instance and its data"):
          machine.succeed(REMOVED)
          machine.wait_until_succeeds(
              "test -z \"$(ls -A /var/lib/hypeman/guests)\"", timeout=180
          )
          machine.fail(f"pgrep -f '{VMM}'")
          listed = json.loads(machine.succeed("hypeman status --json"))
          assert all(i["name"] != "counter" for i in listed), listed
    '';
}
