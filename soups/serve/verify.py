"""Trust in a soup model before anything loads it. A registered soup is the soup's own LoggedModel (its checkpoint
folder, logged once by `ich soup`): `fetch_verified` resolves a models:/ URI, downloads that folder and verifies it as
a soup ingredient is verified (soups.store.registry.verify_pulled: sha256, safetensors, finite weights, tags against
checkpoint.json, the owner's signature; docs/design.md#14), then writes the pyfunc model around it here, from the
installed code (`save_pyfunc`): no MLmodel, code or environment file comes from the server. Versions registered
before that (a separately logged pyfunc model) are still served: `verify_soup_model` checks the whole MLmodel against
an allowlist, every file of the folder, the code file against the installed soups/serve/model.py, the weights against
the sha256 recorded at logging time, then the signature. `ich predict` builds SoupClassifier itself from the verified
weights (`load_soup_model`: nothing from the model folder is imported), `ich serve` hands the verified pyfunc folder to
MLflow's scoring server (soups/serve/app.py).
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ich.checkpoint import CheckpointError
from soups.serve.model import ARTIFACT, CODE_FILE, SoupClassifier, signature
from soups.serve.pyfunc_folder import no_progress_bar
from soups.store.tags import KIND_SOUP, TAG_KIND, TAG_META_SHA256, TAG_SHA256, CheckpointRecord, record_of

WEIGHTS_FILE, META_FILE = "model.safetensors", "checkpoint.json"
TAG_WEIGHTS_SHA256 = TAG_SHA256  # the same tag the registry records on checkpoints


def _sha256(path: str | Path) -> str:
    from ich.checkpoint import sha256_file
    return sha256_file(path)


class UntrustedModel(CheckpointError):
    """A pyfunc model that is not one of this project's soups (or was altered); never loaded. One line naming
    the model and what is wrong (a CheckpointError, so the CLI shows it as a user error, exit 2)."""


# Every file a soup model folder may hold (the checkpoint folder's name under artifacts/ varies).
TEXT_FILES = ("conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
              "serving_input_example.json", "registered_model_meta")
PYFUNC_KEYS = {"artifacts", "cloudpickle_version", "code", "env", "loader_module", "model_code_path",
               "python_version", "streamable"}
TOP_KEYS = {"artifact_path", "flavors", "is_signature_from_type_hint", "metadata", "mlflow_version", "model_id",
            "model_size_bytes", "model_uuid", "prompts", "run_id", "saved_input_example_info", "signature",
            "type_hint_from_example", "utc_time_created"}
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"
INPUT_EXAMPLE_INFO = {"artifact_path": "input_example.json", "pandas_orient": "split",
                      "serving_input_path": "serving_input_example.json", "type": "dataframe"}
MAX_MLMODEL_BYTES = 1 << 20
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".bin", ".dill", ".cloudpickle")


def _is_pickle(path: Path) -> bool:
    """A pickle by name or by its first bytes (protocol 2+ starts with PROTO: 0x80, then 2..5)."""
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _check_mlmodel(local: Path, label: str) -> str:
    """The whole MLmodel against the allowlist; returns the checkpoint folder's path inside the model."""
    import json

    import yaml

    def refuse(what: str):
        raise UntrustedModel(f"{label}: MLmodel {what}; refusing")

    path = local / "MLmodel"
    if path.is_symlink() or not path.is_file():
        raise UntrustedModel(f"{label}: no MLmodel file; not an MLflow model, refusing")
    if path.stat().st_size > MAX_MLMODEL_BYTES:
        refuse(f"is over {MAX_MLMODEL_BYTES} bytes")
    try:
        mlmodel = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError):  # RecursionError: nested ~1,000 deep
        refuse("is not valid YAML")
    if not isinstance(mlmodel, dict):
        refuse("is not a mapping")
    if set(mlmodel) - TOP_KEYS:
        refuse(f"has unexpected key {sorted(set(mlmodel) - TOP_KEYS)[0]!r}")
    flavors = mlmodel.get("flavors")
    if not isinstance(flavors, dict) or set(flavors) != {"python_function"}:
        refuse(f"flavors {sorted(flavors) if isinstance(flavors, dict) else flavors!r} are not just python_function")
    pyfunc = flavors["python_function"]
    if not isinstance(pyfunc, dict):
        refuse("python_function is not a mapping")
    if set(pyfunc) - PYFUNC_KEYS:
        refuse(f"python_function has unexpected key {sorted(set(pyfunc) - PYFUNC_KEYS)[0]!r}")
    if pyfunc.get("loader_module") != CODE_MODEL_LOADER:
        refuse(f"loader_module {pyfunc.get('loader_module')!r} is not {CODE_MODEL_LOADER}")
    code_path = pyfunc.get("model_code_path")
    if not isinstance(code_path, str) or os.path.basename(code_path) != CODE_FILE.name:
        refuse(f"model_code_path {code_path!r} is not this project's {CODE_FILE.name}")
    if pyfunc.get("code") is not None:
        refuse(f"python_function code {pyfunc.get('code')!r} (bundled code dirs) is not allowed")
    if pyfunc.get("env") != {"conda": "conda.yaml", "virtualenv": "python_env.yaml"}:
        refuse(f"python_function env {pyfunc.get('env')!r} is not a soup's")
    if pyfunc.get("streamable") is not False:
        refuse("python_function streamable is not false")
    for key in ("python_version", "cloudpickle_version"):
        if key in pyfunc and not isinstance(pyfunc[key], str):
            refuse(f"python_function {key} is not a string")
    artifacts = pyfunc.get("artifacts")
    entry = artifacts.get(ARTIFACT) if isinstance(artifacts, dict) and set(artifacts) == {ARTIFACT} else None
    folder = entry.get("path") if isinstance(entry, dict) and set(entry) <= {"path", "uri"} else None
    parts = folder.split("/") if isinstance(folder, str) else []
    if len(parts) != 2 or parts[0] != "artifacts" or parts[1] in ("", ".", "..") or "\\" in parts[1]:
        refuse(f"python_function artifacts {artifacts!r} are not one '{ARTIFACT}' checkpoint folder")
    metadata = mlmodel.get("metadata")
    classes = metadata.get("classes") if isinstance(metadata, dict) and set(metadata) == {"classes"} else None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        refuse(f"metadata {metadata!r} is not a soup's (a list of class names)")
    if mlmodel.get("saved_input_example_info", INPUT_EXAMPLE_INFO) != INPUT_EXAMPLE_INFO:
        refuse("saved_input_example_info is not a soup's")
    if mlmodel.get("prompts") is not None or mlmodel.get("is_signature_from_type_hint", False) is not False \
            or mlmodel.get("type_hint_from_example", False) is not False:
        refuse("has prompts or type-hint settings a soup does not have")
    for key in ("artifact_path", "mlflow_version", "model_id", "model_uuid", "run_id", "utc_time_created"):
        if key in mlmodel and not isinstance(mlmodel[key], (str, type(None))):
            refuse(f"{key} is not a string")
    if not isinstance(mlmodel.get("model_size_bytes", 0), int):
        refuse("model_size_bytes is not a number")
    sig = mlmodel.get("signature")
    ours = signature().to_dict()
    try:
        same = isinstance(sig, dict) and set(sig) == set(ours) and all(
            (json.loads(sig[k]) if sig[k] else None) == (json.loads(ours[k]) if ours[k] else None) for k in ours)
    except (TypeError, ValueError):
        same = False
    if not same:
        refuse("signature is not a soup's")
    return folder


def _check_env_files(local: Path, label: str) -> None:
    """requirements.txt, conda.yaml's pip list and python_env.yaml's dependencies hold plain requirements only:
    MLflow reads them when `ich serve` loads the model and follows `-r`/`-c` includes (itself: RecursionError; a
    FIFO: a hang; /dev/zero: unbounded memory), so an include, an option or a URL is refused. python_env.yaml's one
    `-r requirements.txt` is MLflow's own line and the file it names is checked here."""
    import yaml

    def check(line: str, where: str) -> None:
        text = line.split("#", 1)[0].strip()
        if text and (text.startswith("-") or "://" in text or text.startswith((".", "/", "~")) or " @ " in text):
            raise UntrustedModel(f"{label}: {where} line {text[:80]!r} is an include, an option or a URL "
                                 "(only plain requirements are allowed); refusing")

    def load(name: str):
        try:
            return yaml.safe_load((local / name).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError):
            raise UntrustedModel(f"{label}: {name} is not valid YAML; refusing") from None

    if (local / "requirements.txt").is_file():
        try:
            lines = (local / "requirements.txt").read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UntrustedModel(f"{label}: requirements.txt is not UTF-8 text; refusing") from None
        for line in lines:
            check(line, "requirements.txt")
    if (local / "python_env.yaml").is_file():
        env = load("python_env.yaml")
        deps = env.get("dependencies") if isinstance(env, dict) else None
        for dep in deps or []:
            if dep != "-r requirements.txt":
                check(str(dep), "python_env.yaml")
    if (local / "conda.yaml").is_file():
        env = load("conda.yaml")
        for dep in (env.get("dependencies") if isinstance(env, dict) else None) or []:
            for line in (dep.get("pip") or []) if isinstance(dep, dict) else [dep]:
                check(str(line), "conda.yaml")


def verify_soup_model(local: str | Path, recorded: dict[str, str] | None, label: str) -> Path:
    """Check, without importing or unpickling anything from it, that a model folder is one of our soups:
    the whole MLmodel against the allowlist, every file (no pickles, no symlinks, nothing unexpected), the
    code file against the installed project's, and, when `recorded` (the LoggedModel's tags) is given, the
    weights and metadata against the sha256 recorded at logging time. Returns the checkpoint folder."""
    local = Path(local)
    folder = _check_mlmodel(local, label)
    allowed = {"MLmodel", CODE_FILE.name, *TEXT_FILES, f"{folder}/{WEIGHTS_FILE}", f"{folder}/{META_FILE}"}
    for dirpath, dirnames, filenames in os.walk(local):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(local).as_posix()
            if path.is_symlink():
                raise UntrustedModel(f"{label}: {rel} is a symlink; refusing")
            if path.is_dir():
                if rel not in ("artifacts", folder):  # refused before os.walk descends (a 1,100-deep tree recursed out)
                    raise UntrustedModel(f"{label}: unexpected folder {rel} (not part of a soup model); refusing")
                continue
            if not path.is_file():
                raise UntrustedModel(f"{label}: {rel} is not a regular file; refusing")
            if _is_pickle(path):
                raise UntrustedModel(f"{label}: {rel} is a pickle (a soup model holds none); refusing")
            if rel not in allowed:
                raise UntrustedModel(f"{label}: unexpected file {rel} (not part of a soup model); refusing")
    for rel in ("MLmodel", CODE_FILE.name, f"{folder}/{WEIGHTS_FILE}", f"{folder}/{META_FILE}"):
        if not (local / rel).is_file():
            raise UntrustedModel(f"{label}: {rel} is missing; refusing")
    _check_env_files(local, label)
    if (local / CODE_FILE.name).read_bytes() != CODE_FILE.read_bytes():
        raise UntrustedModel(f"{label}: {CODE_FILE.name} differs from the installed soups/serve/{CODE_FILE.name} "
                             f"(sha256 {_sha256(local / CODE_FILE.name)[:12]}…); refusing")
    if recorded is not None:
        for rel, tag in ((f"{folder}/{WEIGHTS_FILE}", TAG_WEIGHTS_SHA256), (f"{folder}/{META_FILE}", TAG_META_SHA256)):
            want = recorded.get(tag)
            if not want:
                raise UntrustedModel(f"{label}: no {tag} recorded at logging time; refusing")
            actual = _sha256(local / rel)
            if actual != want:
                raise UntrustedModel(f"{label}: {rel} sha256 {actual[:12]}… is not the {want[:12]}… recorded at "
                                     f"logging time; refusing")
    return local / folder


@dataclass(frozen=True)
class ModelSource:
    """Where a soup model comes from: what to call it, where to download it, the tags recorded when logged."""
    label: str
    local: Path | None = None  # a local folder (nothing recorded to check the weights against)
    model_id: str | None = None
    recorded: dict[str, str] | None = None
    note: str | None = None  # e.g. an alias on an older version than the newest signed one (a rollback)
    record: CheckpointRecord | None = None  # a soup's own LoggedModel (its checkpoint folder), not a pyfunc model


def resolve_model(uri: str) -> ModelSource:
    """models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-ID or a local folder -> its LoggedModel and tags.
    Whatever a registered version's `source` says, the model downloaded is its LoggedModel's own."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        if "://" in uri or uri.startswith("runs:"):
            raise UntrustedModel(f"{uri}: serve a registered soup (models:/NAME@ALIAS) or a local folder; refusing")
        if not Path(uri).is_dir():
            raise UntrustedModel(f"{uri}: no such model folder")
        return ModelSource(label=uri, local=Path(uri))
    client = MlflowClient()
    spec = uri[len("models:/"):].strip("/")
    try:
        if spec.startswith("m-") and "/" not in spec and "@" not in spec:
            model_id, label = spec, uri
        else:
            alias = None
            if "@" in spec:
                name, alias = spec.rsplit("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif spec.count("/") == 1:
                name, number = spec.split("/")
                version = client.get_model_version(name, number)
            else:
                raise UntrustedModel(f"{uri}: not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
            label = f"{uri} (version {version.version})"
            # The registry links a version to its LoggedModel through `source` (models:/m-…).
            source = version.source or ""
            model_id = version.model_id or (source[len("models:/"):] if source.startswith("models:/m-") else None)
            if not model_id or "/" in model_id:
                raise UntrustedModel(f"{label}: source {source!r} is not a logged soup model (models:/m-…); refusing")
        logged = client.get_logged_model(model_id)
        note = _rollback_note(client, uri, name, version) if not spec.startswith("m-") and alias else None
    except MlflowException as e:
        raise UntrustedModel(f"{uri}: {str(e).splitlines()[0]}") from None
    from soups.store.registry import artifact_location_problem
    if (problem := artifact_location_problem(logged.artifact_location, client.tracking_uri)) is not None:
        raise UntrustedModel(f"{label}: {problem}")  # before anything is downloaded from it
    recorded = dict(logged.tags or {})
    record = record_of(logged) if recorded.get(TAG_KIND) == KIND_SOUP else None
    if recorded.get(TAG_KIND) == KIND_SOUP and record is None:
        raise UntrustedModel(f"{label}: a soup model without the epoch/sha256 tags of a soup record; refusing")
    return ModelSource(label=label, model_id=model_id, recorded=recorded, note=note, record=record)


def _rollback_note(client, uri: str, name: str, version) -> str | None:
    """One note when the alias points at a version older than the newest one signed by a trusted key: allowed
    (any version that verifies may be served; rolling back is how a bad champion is undone), and said."""
    from soups.store import signing

    trusted = signing.trusted_keys()
    newer = [v for v in client.search_model_versions(f"name = '{name}'") if int(v.version) > int(version.version)]
    for v in sorted(newer, key=lambda v: -int(v.version)):
        source = v.source or ""
        model_id = v.model_id or (source[len("models:/"):] if source.startswith("models:/m-") else None)
        if not model_id or "/" in model_id:
            continue
        tags = client.get_logged_model(model_id).tags or {}
        if tags.get(signing.TAG_SIGNATURE) and tags.get(signing.TAG_SIGNED_BY) in trusted:
            return (f"note: {uri} is version {version.version}; version {v.version} is newer and signed by a trusted "
                    "key (a rollback: allowed, the older version is verified like any other)")
    return None


def _download_model(model_id: str, dst: Path, label: str) -> Path:
    """models:/<model_id> under dst; returns the local model folder."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        with no_progress_bar():
            got = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}", dst_path=str(dst))
    except (MlflowException, OSError) as e:
        raise UntrustedModel(f"{label}: cannot download model ({str(e).splitlines()[0]})") from None
    return Path(got)


def fetch_verified(uri: str, dst: str | Path, *, servable: bool = True) -> tuple[ModelSource, Path | None, Path]:
    """Download a soup model under dst (a folder of ours) and verify it; returns (source, pyfunc model folder,
    checkpoint folder). What is used afterwards is exactly this verified copy. servable=False (`ich predict`): only
    the checkpoint is needed, so a soup record gets no pyfunc folder (None)."""
    import shutil

    from soups.store import signing

    source = resolve_model(uri)
    if source.record is not None:
        local, ckpt = _fetch_soup_record(source, Path(dst), servable)
    else:
        local = Path(dst) / "verified-model"  # not an importable name: nothing can `import` it from a cwd
        if source.local is not None:
            verify_soup_model(source.local, None, source.label)  # before copying: no FIFO or device is opened
            shutil.copytree(source.local, local, symlinks=True)
        else:
            local = _download_model(source.model_id, local, source.label)
        ckpt = verify_soup_model(local, source.recorded, source.label)
        # The tags above are anyone's to rewrite: what proves the model is the owner's signature over its id, every
        # file (env files included) and those tags (docs/design.md#14). A local folder is the user's own files.
        if source.model_id is not None:
            signing.verify(source.model_id, source.recorded or {}, local, label=source.label)
    if source.note:
        print(source.note, file=sys.stderr)
    return source, local, ckpt


def _fetch_soup_record(source: ModelSource, dst: Path, servable: bool) -> tuple[Path | None, Path]:
    """A registered soup record: its checkpoint folder downloaded and verified as an ingredient is (sha256, finite
    safetensors, tags against checkpoint.json, the owner's signature over every file and tag), then, to serve it,
    the pyfunc model written around that verified copy from the installed code."""
    from mlflow import MlflowClient

    from soups.serve.pyfunc_folder import save_pyfunc
    from soups.store import registry, signing

    record = source.record
    named = f"checkpoint {record.label()}"  # how verify_pulled names it; the user named the model by its URI
    try:
        ckpt = registry.download_checkpoint(MlflowClient(), record, dst / "record")
        registry.verify_pulled(record, ckpt)
    except (CheckpointError, registry.RegistryError, signing.SignatureError) as e:
        raise type(e)(str(e).replace(named, source.label, 1).splitlines()[0]) from None
    if not servable:
        return None, ckpt
    local = save_pyfunc(ckpt, dst / "verified-model")
    return local, verify_soup_model(local, None, source.label)  # what MLflow wrote is what a soup model holds


def load_soup_model(uri: str) -> SoupClassifier:
    """Download, verify, then build SoupClassifier from the verified weights; nothing from the model folder
    is imported or unpickled (MLflow's loader is not used)."""
    from mlflow.pyfunc import PythonModelContext

    with tempfile.TemporaryDirectory(prefix="ich-model-") as tmp:
        source, _, ckpt = fetch_verified(uri, tmp, servable=False)
        model = SoupClassifier()
        try:
            model.load_context(PythonModelContext(artifacts={ARTIFACT: str(ckpt)}, model_config=None))
        except CheckpointError as e:
            raise named_by_model(e, ckpt, source.label) from None
    return model


def named_by_model(error: CheckpointError, ckpt: Path, label: str) -> CheckpointError:
    """A refusal about the verified private copy's checkpoint, named by the model it came from (the copy's path is
    a temporary folder, gone when the line is read)."""
    return CheckpointError(str(error).replace(str(ckpt), f"{label}: {ckpt.parent.name}/{ckpt.name}"))
