# Builds a complete hypeman config dir in the store:
#
#   $out/hypeman.toml            the settings
#   $out/instances/<name>.toml   one declaration per instance
#
# and, when `check` is true, runs `hypeman validate --config-dir $out` on it,
# so a bad declaration fails the build (and so `nixos-rebuild`) with the
# daemon's own `path:line:column: message` lines, instead of being reported by
# the running daemon. `validate` reads nothing but the config dir: no data
# dir, no VM, no network.
#
# `instances/` always exists, even when it is empty: the daemon treats a
# missing instances directory as "a rebuild in progress, delete nothing", so
# an empty directory is what makes removing the last instance delete it.
{
  lib,
  runCommand,
  formats,
  stdenv,
}:

{
  package,
  # Attrset rendered as hypeman.toml.
  settings ? { },
  # name -> attrset rendered as instances/<name>.toml. null values are
  # dropped (TOML has no null; an unset key means "use the default").
  instances ? { },
  check ? true,
  name ? "hypeman-config",
}:

let
  toml = formats.toml { };

  clean =
    value:
    lib.filterAttrsRecursive (_: v: v != null) (
      removeAttrs value [ "_module" ]
    );

  # An empty `[env]` or `env_files` would be harmless; leaving them out
  # keeps the file tidy.
  cleanInstance =
    value: lib.filterAttrs (k: v: !(k == "env" && v == { }) && !(k == "env_files" && v == [ ])) (clean value);

  settingsFile = toml.generate "hypeman.toml" (clean settings);
  instanceFiles = lib.mapAttrs (n: v: toml.generate "${n}.toml" (cleanInstance v)) instances;

  canRun = stdenv.buildPlatform.canExecute stdenv.hostPlatform;
in
runCommand name
  {
    passthru = { inherit settingsFile instanceFiles; };
  }
  (
    ''
      mkdir -p $out/instances
      cp ${settingsFile} $out/hypeman.toml
    ''
    + lib.concatStrings (
      lib.mapAttrsToList (n: file: ''
        cp ${file} $out/instances/${lib.escapeShellArg "${n}.toml"}
      '') instanceFiles
    )
    + lib.optionalString (check && canRun) ''
      echo "hypeman validate --config-dir $out"
      if ! ${lib.getExe package} validate --config-dir "$out"; then
        echo "hypeman: the generated configuration is invalid (see above)." >&2
        echo "Fix services.hypeman.settings / services.hypeman.instances, or set services.hypeman.checkConfig = false." >&2
        exit 1
      fi
    ''
  )
