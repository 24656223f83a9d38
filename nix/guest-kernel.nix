# A NixOS kernel package turned into what hypeman's `[guest]` settings need:
#
#   $out/kernel                       the image the VMM boots: the PVH-capable
#                                     `vmlinux` ELF on x86_64 (both VMMs boot
#                                     it; Cloud Hypervisor takes a bzImage too,
#                                     but only from v39.0), the arch's kernel
#                                     image (`Image`) elsewhere
#   $out/lib/modules/<version>/       the modules, decompressed, with a fresh
#                                     modules.dep
#
# Why a copy of the modules: NixOS kernels compress their modules (.ko.xz or
# .ko.zst), and hypeman's initrd builder loads plain `.ko` files only (it
# refuses compressed ones with "decompress the modules and rerun depmod").
# This is that, done once at build time. It costs store space (the whole
# module tree, uncompressed); a smaller kernel (a custom `linuxPackages_*`
# with fewer modules) makes it smaller.
#
# Where the modules are: newer nixpkgs kernels have a separate `modules`
# output; older ones keep them in `out`. Both are tried.
{
  lib,
  stdenv,
  runCommand,
  buildPackages,
}:

kernel:

let
  version = kernel.modDirVersion;
  image =
    if stdenv.hostPlatform.isx86_64 then
      "${kernel.dev}/vmlinux"
    else
      "${kernel}/${stdenv.hostPlatform.linux-kernel.target}";
  moduleRoots = lib.unique (
    lib.optional (kernel ? modules && lib.isDerivation kernel.modules) "${kernel.modules}"
    ++ [ "${kernel}" ]
  );
in
runCommand "hypeman-guest-kernel-${version}"
  {
    nativeBuildInputs = [
      buildPackages.kmod
      buildPackages.xz
      buildPackages.zstd
      buildPackages.gzip
    ];
    passthru = { inherit kernel version; };
  }
  ''
    src=
    for root in ${lib.escapeShellArgs moduleRoots}; do
      if [ -d "$root/lib/modules/${version}/kernel" ]; then
        src="$root/lib/modules/${version}"
        break
      fi
    done
    if [ -z "$src" ]; then
      echo "no lib/modules/${version}/kernel in ${lib.concatStringsSep " or " moduleRoots}" >&2
      exit 1
    fi

    dst=$out/lib/modules/${version}
    mkdir -p "$dst"
    cp -r --no-preserve=mode "$src/kernel" "$dst/"
    for f in modules.order modules.builtin modules.builtin.modinfo; do
      if [ -e "$src/$f" ]; then cp "$src/$f" "$dst/"; fi
    done

    find "$dst" -name '*.ko.xz' -exec xz -d {} +
    find "$dst" -name '*.ko.zst' -exec zstd -q -d --rm {} +
    find "$dst" -name '*.ko.gz' -exec gzip -d {} +
    depmod -b "$out" -a ${version}
    test -s "$dst/modules.dep"

    ln -s ${image} $out/kernel
  ''
