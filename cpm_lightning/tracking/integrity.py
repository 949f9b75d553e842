"""What a pulled release is checked against (docs/ARCHITECTURE.md, "Releases"): its manifest,
anchored by a tag outside the artifact store, and optionally an OpenSSF model-signing signature.

    MANIFEST.json   the sha256 and size of every other file of the logged MLflow model (MLmodel,
                    the model code, the environment files, the model directory under artifacts/);
                    trusted only because its own sha256 is the model version's tag MANIFEST_TAG,
                    which lives in the tracking database, not in the artifact store
    model.sig       with `release --sign-key`: a model-signing bundle over every file, the
                    manifest included; checked with the public key of `pull --verify-key`
    artifacts/model the model directory (cpm_lightning/checkpoint/modeldir.py)
    artifacts/variants/NAME
                    with `release --quantize`: the same weights as a model directory at another
                    precision (int8, int4, bfloat16, ...); `pull --variant NAME` downloads it,
                    MLflow's files and the card, and verifies them against the manifest alone

No MLflow: the checks work on a local directory, so nothing downloaded is imported before them.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Collection, Iterable
from pathlib import Path

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import sha256
from cpm_lightning.core.precision import DTYPE_NAMES, METHODS

MANIFEST, SIGNATURE, MODEL_DIR = "MANIFEST.json", "model.sig", Path("artifacts/model")
VARIANTS_DIR = Path("artifacts/variants")
VARIANT_NAMES = tuple(n for n in (*METHODS, *DTYPE_NAMES) if n != "float32")  # float32 is the release itself
CARD, WEIGHTS = "MODEL_CARD.md", "model.safetensors"  # modeldir's names (importing it brings torch)
MANIFEST_TAG = "cpm.manifest_sha256"
# model-signing signs with elliptic-curve keys on the curves Sigstore's bundle format names.
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _covered(root: Path) -> dict[str, Path]:
    """What the manifest covers: every entry under `root` that is not a directory (symlinks
    included, so they are seen and refused) but the manifest and the signature, by
    '/'-separated relative path."""
    entries = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_symlink() or not p.is_dir()}
    return {rel: p for rel, p in sorted(entries.items()) if rel not in (MANIFEST, SIGNATURE)}


def write_manifest(root: Path) -> str:
    """Write root/MANIFEST.json over every file under `root`; returns its sha256 (the tag)."""
    files = {rel: {"sha256": sha256(p), "size": p.stat().st_size} for rel, p in _covered(root).items()}
    (root / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
    return sha256(root / MANIFEST)


def read_manifest(root: Path, expected_sha256: str, where: str) -> dict[str, dict]:
    """The files root/MANIFEST.json lists ('/'-separated path -> sha256 and size), once its
    sha256 is the one the tag records; a UserError otherwise."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{where}: the release has no {MANIFEST}; its tag {MANIFEST_TAG} expects one")
    actual = sha256(manifest)
    if actual != expected_sha256:
        raise UserError(f"{where}: {MANIFEST} has sha256 {actual[:16]}..., but the tag {MANIFEST_TAG} records "
                        f"{expected_sha256[:16]}...; the release was changed in the artifact store")
    return json.loads(manifest.read_text())["files"]  # trusted from here on: its hash is the tag's


def verify_manifest(root: Path, expected_sha256: str, where: str, only: Collection[str] | None = None) -> None:
    """A UserError unless root/MANIFEST.json has the sha256 the tag records and `root` holds
    exactly the files it lists (those of `only`, for a partial download: `variant_files`), each
    with its size and sha256. Every problem is named in one line."""
    listed = read_manifest(root, expected_sha256, where)
    if only is not None:
        listed = {rel: entry for rel, entry in listed.items() if rel in only}
    present = _covered(root)
    problems = []
    for rel in sorted(listed.keys() | present.keys()):
        path, entry = present.get(rel), listed.get(rel)
        if path is None:
            problems.append(f"{rel}: missing")
        elif entry is None:
            problems.append(f"{rel}: not in the manifest")
        elif path.is_symlink() or not path.is_file():
            problems.append(f"{rel}: not a regular file")
        elif (size := path.stat().st_size) != entry["size"]:
            problems.append(f"{rel}: {size} bytes, the manifest records {entry['size']}")
        elif (digest := sha256(path)) != entry["sha256"]:
            problems.append(f"{rel}: sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}...")
    if problems:
        raise UserError(f"{where}: the release does not match its manifest: {'; '.join(problems)}")


def check_variants(names: Iterable[str], where: str) -> list[str]:
    """`names` (what `release --quantize` or live.release_quantize asks for), each a variant a
    release can add, each once; a UserError naming `where` otherwise."""
    names = list(names)
    for name in names:
        if name not in VARIANT_NAMES:
            raise UserError(f"{where}: {name!r} is not a variant; expected some of {', '.join(VARIANT_NAMES)} "
                            "(float32 is the release itself)")
    if len(set(names)) < len(names):
        raise UserError(f"{where}: {', '.join(names)} names a variant twice")
    return names


def variants(listed: Iterable[str]) -> list[str]:
    """The variants of a release, from the paths of its files."""
    prefix = f"{VARIANTS_DIR.as_posix()}/"
    return sorted({rel.removeprefix(prefix).split("/")[0] for rel in listed if rel.startswith(prefix)})


def variant_files(listed: Iterable[str], variant: str) -> list[str]:
    """What `pull --variant` downloads of a release's files: MLflow's own (outside artifacts/,
    the manifest and signature among them), the card, and the variant's model directory."""
    card, own = (MODEL_DIR / CARD).as_posix(), f"{(VARIANTS_DIR / variant).as_posix()}/"
    return [rel for rel in listed if not rel.startswith("artifacts/") or rel == card or rel.startswith(own)]


def release_model_dir(model_dir: Path, variants_dir: Path | None) -> Path:
    """The model directory a pulled release runs: the float weights when they were pulled, else
    the one variant `pull --variant` wrote."""
    if (model_dir / WEIGHTS).is_file() or variants_dir is None or not variants_dir.is_dir():
        return model_dir
    pulled = sorted(p for p in variants_dir.iterdir() if p.is_dir())
    if len(pulled) != 1:
        raise UserError(f"{model_dir.parents[1]}: the release has no {WEIGHTS} and {len(pulled)} variants; expected "
                        "what `pull` writes (the whole release, or one --variant)")
    return pulled[0]


def check_key(path: Path, flag: str, private: bool) -> None:
    """A UserError unless `path` is a PEM key model-signing can use (unencrypted, when private).
    `flag` names where the path came from."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    kind = "an unencrypted PEM private key" if private else "a PEM public key"
    expected = f"expected {kind} on an elliptic curve model-signing uses ({', '.join(CURVES.values())})"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{flag} {path}: {e.strerror}; {expected}") from None
    try:
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except (ValueError, TypeError):  # TypeError: an encrypted private key
        raise UserError(f"{flag} {path}: not {kind}; {expected}") from None
    public = key.public_key() if private else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in CURVES:
        found = f"curve {public.curve.name}" if isinstance(public, ec.EllipticCurvePublicKey) else type(public).__name__
        raise UserError(f"{flag} {path}: model-signing cannot use this key ({found}); {expected}")


def sign(root: Path, key: Path) -> None:
    """Write root/model.sig: model-signing's signature of every file under `root` with the
    private `key`."""
    from model_signing import hashing, signing

    # Not ignoring git's file names: every file is signed. The signature ignores only itself.
    files = hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)
    signing.Config().set_hashing_config(files).use_elliptic_key_signer(private_key=key).sign(root, root / SIGNATURE)


def verify_signature(root: Path, key: Path, where: str) -> None:
    """A UserError unless root/model.sig is a signature by the private half of `key` of exactly
    the files under `root`."""
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    signature = root / SIGNATURE
    if not signature.is_file():
        raise UserError(f"{where}: the release is not signed (no {SIGNATURE}); {key} is trusted, so a release "
                        "must be signed with its private key (`release --sign-key`)")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=key).verify(root, signature)
    except InvalidSignature:
        raise UserError(f"{where}: {SIGNATURE} does not verify with {key}; it was forged or damaged") from None
    except ValueError as e:
        message = str(e)
        if message.startswith("Key mismatch"):
            raise UserError(f"{where}: {SIGNATURE} was made with another key than {key}") from None
        if message.startswith("Signature mismatch: "):
            raise UserError(f"{where}: the files differ from those {key} signed ({_differences(message)}); the "
                            "release was changed or re-made after it was signed") from None
        raise UserError(f"{where}: {SIGNATURE} is not a signature model-signing can read ({message})") from None
    except (KeyError, TypeError) as e:
        raise UserError(f"{where}: {SIGNATURE} is not a signature model-signing can read "
                        f"({type(e).__name__}: {e})") from None


def _differences(message: str) -> str:
    """model-signing's list of differences, without the digests' bytes and the local
    directory's name (its format is not an API: on any other shape, the message as it is)."""
    try:
        differences = ast.literal_eval(message.removeprefix("Signature mismatch: "))
    except (ValueError, SyntaxError):
        return message
    return "; ".join(re.sub(r" in model '[^']*'", "", d.split(": Expected", 1)[0]) for d in differences)
