# The systemd sandbox of hypeman.service: the serviceConfig keys that
# confine the daemon, and with it every VMM it spawns (they inherit its
# namespaces, capability bounding set and system call filter).
#
# Plain Nix, no nixpkgs: `scripts/unit-security.sh` evaluates this file with
# `nix-instantiate --eval`, renders it into a unit file and scores that with
# `systemd-analyze security --offline`, so the score in README is checked
# where nixpkgs cannot be fetched; the NixOS VM test asserts the same bound
# on the real unit.
#
# What is left out, and why:
# - PrivateDevices: it would hide /dev/kvm, /dev/net/tun and /dev/vfio; the
#   device list below allows exactly those instead.
# - MemoryDenyWriteExecute: QEMU's TCG translates guest code into
#   executable memory (and a JIT inside the VMM's seccomp is QEMU's
#   business, not the daemon's).
# - ProtectProc=invisible: with it the daemon would not see VMMs that run
#   as another user (issue 11, VMMs without root) without CAP_SYS_PTRACE.
# - PrivateUsers, PrivateNetwork: the daemon makes TAPs and bridges in the
#   host's network namespace, as root there.
# - RestrictSUIDSGID: image layers carry set-uid files (`su`, `passwd`),
#   unpacked as they are into the guest's root disk.
# - An allow-list SystemCallFilter: QEMU and Cloud Hypervisor each install
#   their own, tighter filter per VMM; the daemon's filter below only denies
#   groups no VMM or daemon code uses.
#
# dataDir: the daemon's data dir. writablePaths: what else the VMMs write,
# the sources of writable volumes (a missing one does not fail the start:
# the daemon reports it, naming the declaration).
{
  dataDir,
  writablePaths ? [ ],
}:

{
  # The data dir and the writable volumes are the only places written (tmp
  # is private).
  ProtectSystem = "strict";
  ReadWritePaths = [ dataDir ] ++ map (p: "-${p}") writablePaths;
  # `oci:<dir>` images may sit in a home directory: readable, not writable.
  ProtectHome = "read-only";
  PrivateTmp = true;
  UMask = "0077";

  # Spawning a VMM as an unprivileged user is a drop of privileges (setuid
  # from root, or QEMU's -runas), which no_new_privs does not prevent; no
  # set-uid helper is ever run.
  NoNewPrivileges = true;

  # What the daemon does as root: TAPs, bridges and addresses (NET_ADMIN);
  # image layers unpacked with their owners and modes (CHOWN, DAC_OVERRIDE,
  # FOWNER, FSETID); VMMs started as, handed files of, and stopped as
  # another user (SETUID, SETGID, KILL); guest memory pinned for VFIO
  # (IPC_LOCK, SYS_RESOURCE for the memlock limit a VMM raises); the device
  # nodes some image layers carry (MKNOD: made, never opened, see
  # DeviceAllow).
  CapabilityBoundingSet = [
    "CAP_NET_ADMIN"
    "CAP_CHOWN"
    "CAP_DAC_OVERRIDE"
    "CAP_FOWNER"
    "CAP_FSETID"
    "CAP_MKNOD"
    "CAP_SETUID"
    "CAP_SETGID"
    "CAP_KILL"
    "CAP_IPC_LOCK"
    "CAP_SYS_RESOURCE"
  ];

  # Unix (VMM APIs, QMP, the agent), netlink (links and addresses), inet
  # (registries, health checks), vsock (QEMU's vhost-vsock agent channel).
  RestrictAddressFamilies = [
    "AF_UNIX"
    "AF_NETLINK"
    "AF_INET"
    "AF_INET6"
    "AF_VSOCK"
  ];

  DevicePolicy = "closed";
  DeviceAllow = [
    "/dev/kvm rw"
    "/dev/net/tun rw"
    "/dev/vhost-net rw"
    "/dev/vhost-vsock rw"
    "/dev/userfaultfd rw"
    "/dev/vfio/vfio rw"
    "char-vfio rw"
  ];

  ProtectKernelTunables = true;
  ProtectKernelModules = true;
  ProtectKernelLogs = true;
  ProtectControlGroups = true;
  # The guest's clock is stepped inside the guest (the agent); the host's is
  # never touched.
  ProtectClock = true;
  ProtectHostname = true;
  PrivateMounts = true;
  LockPersonality = true;
  RestrictRealtime = true;
  RestrictNamespaces = true;
  RemoveIPC = true;
  SystemCallArchitectures = "native";
  SystemCallErrorNumber = "EPERM";
  SystemCallFilter = [
    "~@clock"
    "~@cpu-emulation"
    "~@debug"
    "~@module"
    "~@mount"
    "~@obsolete"
    "~@raw-io"
    "~@reboot"
    "~@swap"
  ];
}
