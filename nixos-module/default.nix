# services.hypeman: the hypeman daemon, its settings and its instances.
#
# Every instance becomes /etc/hypeman/instances/<name>.toml and the settings
# /etc/hypeman/hypeman.toml; the daemon converges the instances to their
# declared `state`. A rebuild that changes only declarations *reloads* the
# daemon (SIGHUP, a full rescan); one that changes the settings restarts it
# (they are read at start only), and a restart leaves running VMs alone
# (KillMode=process, below).
#
# Guest networking (services.hypeman.network) is written to the settings'
# `[network]` table and configures the host around the daemon's bridge: the
# firewall, NAT for outbound access, and NetworkManager / systemd-networkd /
# dhcpcd kept off the bridge and the guests' TAPs.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    mkDefault
    types
    literalExpression
    ;

  cfg = config.services.hypeman;
  toml = pkgs.formats.toml { };

  # The daemon's own rule for instance names (the declaration's file stem).
  inherit (import ../nix/names.nix) nameRegex validName;

  buildConfigDir = pkgs.callPackage ../nix/config-dir.nix { };
  guestKernelFiles =
    if cfg.guestKernel == null then
      null
    else
      pkgs.callPackage ../nix/guest-kernel.nix { } cfg.guestKernel;

  instanceModule = {
    # Any key of the declaration format works (disk_io, volumes, devices,
    # …); the options below are the common ones, typed so a typo in
    # a value fails at evaluation. Unknown keys are still caught: by
    # `hypeman validate` at build time (checkConfig).
    freeformType = toml.type;

    options = {
      image = mkOption {
        type = types.str;
        example = "docker.io/library/nginx:alpine";
        description = ''
          The OCI image: a registry reference, `oci:<dir>[:tag]` or
          `oci-archive:<file>[:tag]` (absolute paths; a store path works).
        '';
      };
      state = mkOption {
        type = types.enum [
          "running"
          "standby"
          "stopped"
        ];
        default = "running";
        description = ''
          The state the daemon converges the instance to. `standby`
          snapshots it to disk and leaves no VMM process; `running` again
          restores it from that snapshot.
        '';
      };
      restart = mkOption {
        type = types.nullOr (
          types.enum [
            "always"
            "on-failure"
            "never"
          ]
        );
        default = null;
        description = ''
          What happens when the guest ends on its own while `state` is
          `running` (the app exited, or the VMM died): `always` boots it
          again (the default), `on-failure` unless the app exited with
          status 0, `never` leaves it stopped with its exit shown in status.
        '';
      };
      hypervisor = mkOption {
        type = types.nullOr (
          types.enum [
            "cloud-hypervisor"
            "qemu"
          ]
        );
        default = null;
        description = "The VMM; null means the settings' `default_hypervisor`.";
      };
      vcpus = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        example = 2;
        description = "Virtual CPUs (default 1).";
      };
      memory = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "1GiB";
        description = "Boot memory, binary units: at least 64MiB, a multiple of 2MiB (default 512MiB).";
      };
      hotplug_memory = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "3GiB";
        description = "Extra memory that can be plugged in later (virtio-mem), 0 or a multiple of 128MiB.";
      };
      overlay_size = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10GiB";
        description = "Size of the writable overlay over the read-only image (default 1GiB).";
      };
      entrypoint = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        description = "Overrides the image's entrypoint (and then drops the image's cmd).";
      };
      cmd = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        example = [
          "nginx"
          "-g"
          "daemon off;"
        ];
        description = "Overrides the image's cmd.";
      };
      workdir = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Overrides the image's working directory (absolute).";
      };
      env = mkOption {
        type = types.attrsOf types.str;
        default = { };
        example = {
          GREETING = "hello";
        };
        description = ''
          Environment variables, added to (and overriding) the image's and
          those of `env_files`. They are written into the Nix store (the
          generated declaration): put secrets in `env_files` instead.
        '';
      };
      env_files = mkOption {
        # Strings, not `types.path`: a path value would copy the file into
        # the world-readable Nix store, which is what this option avoids.
        type = types.listOf (types.strMatching "/.+");
        default = [ ];
        example = [ "/run/secrets/web.env" ];
        description = ''
          Absolute paths of files of `NAME=value` lines (a `#` comment, blank
          lines, optional quotes and `export `; see the project README)
          whose variables the app gets: over the image's, under `env`, a
          later file over an earlier one. The daemon reads them at every
          cold boot of the guest; only the paths reach the Nix store and
          the guest's record (with a digest of the variables, so a changed
          file restarts the guest), never the values. For secrets managed
          by agenix (`config.age.secrets.<name>.path`) or sops-nix
          (`config.sops.secrets.<name>.path`). Each file must be owned by
          root and not writable by group or others; the daemon refuses
          others, and warns about a world-readable one.
        '';
      };
      network = mkOption {
        type = types.nullOr (
          types.submodule {
            freeformType = toml.type;
            options = {
              enabled = mkOption {
                type = types.bool;
                default = false;
                description = ''
                  Give the guest a NIC: a TAP on `services.hypeman.network.bridge`
                  and a static address from its subnet (shown by `hypeman status`).
                '';
              };
              bandwidth_down = mkOption {
                type = types.nullOr types.str;
                default = null;
                example = "100Mbit";
                description = "Host → guest rate limit (Cloud Hypervisor only); null: unlimited.";
              };
              bandwidth_up = mkOption {
                type = types.nullOr types.str;
                default = null;
                example = "10MiB/s";
                description = "Guest → host rate limit (Cloud Hypervisor only); null: unlimited.";
              };
            };
          }
        );
        default = null;
        example = {
          enabled = true;
        };
        description = "The `[network]` table; null: no NIC, loopback only.";
      };
    };
  };

  # The TOML of each instance: its options without the unset ones (the
  # config-dir builder drops nulls and an empty env). A submodule's value
  # carries `_module`, which is not TOML, at every level that is one.
  instancesToml = lib.mapAttrs (
    _: inst:
    removeAttrs inst [ "_module" ]
    // lib.optionalAttrs (inst.network != null) {
      network = removeAttrs inst.network [ "_module" ];
    }
  ) cfg.instances;

  # The sources of the declared writable volumes: the sandbox lets the VMMs
  # write exactly those outside the data dir.
  volumeSources = lib.concatMap (
    inst: map (v: v.source) (lib.filter (v: v ? source && !(v.readonly or false)) (inst.volumes or [ ]))
  ) (lib.attrValues cfg.instances);

  configDir = buildConfigDir {
    package = cfg.package;
    settings = cfg.settings;
    instances = instancesToml;
    check = cfg.checkConfig;
  };
in
{
  # services.hypeman.network: the host side of guest networking.
  imports = [ ./network.nix ];

  options.services.hypeman = {
    enable = mkEnableOption "hypeman, the declarative microVM manager";

    package = mkOption {
      type = types.package;
      # Like mkPackageOption: `pkgs.hypeman`, so an overlay that replaces it
      # (the flake's, or the user's own) is followed. Without one the module
      # builds this repository (it sits in it), so it works either way.
      default = pkgs.hypeman or (pkgs.callPackage ../nix/package.nix { });
      defaultText = literalExpression "pkgs.hypeman, or this repository's nix/package.nix when no overlay provides it";
      description = "The hypeman package to use (with hypeman-init next to the hypeman binary).";
    };

    dataDir = mkOption {
      # A string, not a path: a path value would be copied into the store.
      type = types.strMatching "/.+";
      default = "/var/lib/hypeman";
      description = ''
        Guests, images, snapshots and logs. Passed as `--data-dir` and written
        as the settings' `data_dir`, so the `hypeman` CLI finds the same data.
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = toml.type; };
      default = { };
      example = literalExpression ''
        {
          default_hypervisor = "qemu";
          guest.cmdline = "quiet";
          reconcile.stop_grace = "10s";
          limits.max_memory = "16GiB";
        }
      '';
      description = ''
        Rendered to /etc/hypeman/hypeman.toml; every key of hypeman's settings
        file works (see examples/hypeman.toml). The module fills in
        `data_dir`, the hypervisor binaries (store paths) and, when
        `guestKernel` is set, `guest.kernel` and `guest.modules_dir`, all as
        defaults you can override. The `network` table comes from
        `services.hypeman.network` (set it there, not here). A change here
        restarts the daemon (it reads its settings at start); the running
        VMs are adopted.
      '';
    };

    guestKernel = mkOption {
      type = types.nullOr types.package;
      default = null;
      example = literalExpression "pkgs.linuxPackages.kernel";
      description = ''
        A kernel package to boot the guests with. When set, its image and a
        decompressed copy of its modules fill `settings.guest.kernel` and
        `settings.guest.modules_dir`. When null, set those yourself; the
        daemon reports a missing kernel when it first needs to boot a guest.
      '';
    };

    instances = mkOption {
      type = types.attrsOf (types.submodule instanceModule);
      default = { };
      example = literalExpression ''
        {
          web = {
            image = "docker.io/library/nginx:alpine";
            vcpus = 2;
            memory = "1GiB";
            disk_io.iops = 2000;
          };
          batch = {
            image = "docker.io/library/python:3.12-slim";
            state = "stopped";
          };
        }
      '';
      description = ''
        One declaration per instance, rendered to
        /etc/hypeman/instances/<name>.toml. Removing an instance here deletes
        the instance and its data on the next switch.
      '';
    };

    writablePaths = mkOption {
      type = types.listOf (types.strMatching "/.+");
      default = [ ];
      example = [ "/srv/volumes" ];
      description = ''
        Paths outside `dataDir` the daemon and its VMMs may write, besides
        the sources of writable volumes declared in `instances` (added by
        themselves): the service runs with `ProtectSystem=strict`, so a
        volume of a declaration written outside Nix needs its file or
        directory listed here.
      '';
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run `hypeman validate` on the generated configuration at build time,
        so an invalid declaration fails the rebuild instead of the daemon.
        Skipped automatically when cross-compiling.
      '';
    };

    configDir = mkOption {
      type = types.package;
      readOnly = true;
      internal = true;
      description = "The generated (and validated) config dir.";
    };
  };

  config = mkIf cfg.enable {
    assertions = lib.mapAttrsToList (name: _: {
      assertion = validName name;
      message = ''
        services.hypeman.instances."${name}": instance names must match
        ^${nameRegex}$ (lowercase letters, digits and inner dashes, at most 63).
      '';
    }) cfg.instances;

    services.hypeman.configDir = configDir;

    services.hypeman.settings = {
      data_dir = mkDefault cfg.dataDir;
      # Store paths, so the daemon does not depend on PATH.
      qemu.binary = mkDefault "${pkgs.qemu_kvm}/bin/qemu-system-${pkgs.stdenv.hostPlatform.qemuArch}";
      cloud_hypervisor = mkIf (lib.meta.availableOn pkgs.stdenv.hostPlatform pkgs.cloud-hypervisor) {
        binary = mkDefault "${pkgs.cloud-hypervisor}/bin/cloud-hypervisor";
      };
      guest = mkIf (guestKernelFiles != null) {
        kernel = mkDefault "${guestKernelFiles}/kernel";
        modules_dir = mkDefault "${guestKernelFiles}/lib/modules/${guestKernelFiles.version}";
      };
    };

    # Two links, not one per instance: `instances` is a link to a store
    # directory that always exists (empty when no instance is declared), so a
    # switch changes every declaration at once and removing the last one
    # deletes it (the daemon ignores a *missing* instances directory).
    environment.etc."hypeman/hypeman.toml".source = "${configDir}/hypeman.toml";
    environment.etc."hypeman/instances".source = "${configDir}/instances";

    environment.systemPackages = [ cfg.package ];

    # /dev/kvm: the kvm-intel / kvm-amd module is loaded by udev from the
    # CPU's modalias; listing both in boot.kernelModules would make the wrong
    # one fail at every boot, so the module does not.

    systemd.tmpfiles.rules = lib.optional (!lib.hasPrefix "/var/lib/" cfg.dataDir) "d ${cfg.dataDir} 0700 root root - -";

    systemd.services.hypeman = {
      description = "hypeman microVM manager";
      wantedBy = [ "multi-user.target" ];
      # network.target is a passive unit: services order themselves after
      # it, and only its providers pull it in.
      after = [ "network.target" ];

      # /etc is a set of store links: changing a declaration produces no
      # inotify event in the directory the daemon watches, so a switch must
      # tell it. Listing the config here makes switch-to-configuration reload
      # (ExecReload: SIGHUP = full rescan) rather than restart when only the
      # declarations changed. The daemon also re-stats its instances
      # directory every second, which catches the link swap on its own.
      reloadTriggers = [ configDir ];
      # The settings (hypeman.toml) are read once, at start: a change to
      # them restarts the daemon, which adopts the running VMMs.
      restartTriggers = [ configDir.settingsFile ];

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} daemon --config-dir /etc/hypeman --data-dir ${cfg.dataDir}";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";

        # The VMM processes are the daemon's children and live in this unit's
        # cgroup. With the default KillMode=control-group, stopping or
        # restarting the daemon (a package update, `systemctl restart`)
        # would kill every running VM. KillMode=process signals only the
        # daemon; the VMMs keep running and the next daemon adopts them
        # (it never starts a second VMM for an instance whose VMM is alive).
        # Consequence: `systemctl stop hypeman` does not stop the VMs; set
        # their `state` to "stopped" or "standby" for that.
        KillMode = "process";
        Restart = "on-failure";
        RestartSec = "2s";

        # VFIO passthrough (`devices`) pins guest memory.
        LimitMEMLOCK = "infinity";
        LimitNOFILE = 1048576;
      }
      # The sandbox, which every VMM inherits: what it allows and why is in
      # hardening.nix (scored by scripts/unit-security.sh, and by the VM test).
      // import ./hardening.nix {
        inherit (cfg) dataDir;
        writablePaths = volumeSources ++ cfg.writablePaths;
      }
      // lib.optionalAttrs (lib.hasPrefix "/var/lib/" cfg.dataDir) {
        StateDirectory = lib.removePrefix "/var/lib/" cfg.dataDir;
        # What the daemon sets at start too: 0710 to the VMMs' shared group
        # while VMMs run as their own users (they pass through it to their
        # guest's directory), 0700 with `[vmm] users = "root"`.
        StateDirectoryMode = if ((cfg.settings.vmm or { }).users or "per-instance") == "root" then "0700" else "0710";
      };
    };
  };
}
