"""Signed Ray Tune search state, so that `jobs/tune.py --resume` never unpickles a file it did not write.

Threat. Ray's `Tuner.restore` unpickles `tuner.pkl`, and the experiment state it then reads is
pickles too: `experiment_state-*.json` embeds cloudpickled fields, `basic-variant-state-*.json`,
`searcher-state-*.pkl` and `callback-states-*.pkl` are whole pickles. Whoever can write the
search's storage folder (a shared S3 prefix or file system) could leave a pickle there that runs
code on the machine that resumes, with that user's rights.

Mechanism. Every file at the top of the search's folder that Ray may deserialise (`*.pkl`, `*.json`;
Ray copies exactly these down on restore), and each trial folder's `error.pkl`, is signed with
HMAC-SHA256 under a key that stays on the machine that drives the search: `--state-key` or
$TRANSMUTE_TUNE_KEY, default `<home>/keys/tune-state.key`, created with mode 0600 on first use; a
key that group or others can read, or another user owns, is refused. The MAC covers the search name
and the file name, so a signed file cannot be replayed under another search or another role. The
MACs go to `<storage>/<name>/state-signatures`, a list per file of the MACs of its last few
versions; the list needs no signature of its own, since nobody without the key can compute a valid
entry.

When. `tuner.pkl` right after Ray writes it (when the Tuner is made). The experiment state every
time Ray saves it: Ray calls each callback's `get_state()` inside its `save_to_dir()`, after the
new experiment and searcher state are written to the driver's local staging folder and before
that folder is uploaded; `StateSigner.get_state` signs the staged files and writes the list to
storage there and then. So storage never holds a version whose MAC is not listed yet, and since
the list keeps the previous versions too, a search killed hard in the middle of an upload leaves
either an old version or the new one, both listed.

Resume. `verify` checks every such file before anything calls `Tuner.restore`; one without a
valid MAC is refused (`StateRefused`, naming the file and how to go on), and nothing is unpickled.

Residual risks. (1) Check, then use: Ray reads the files again after `verify`, and a writer who
swaps one in those seconds still wins; Ray takes a path, never verified bytes. (2) `tuner.pkl` is
read back from storage to be signed, a few milliseconds after Ray wrote it. (3) The first state
save of a search happens before the signer sees a trial (Ray tells callbacks where its staging
folder is only through trials); it is signed at the end of that same step, so a search killed in
those milliseconds cannot be resumed (start it again). (4) Rollback: an older signed version of a
file (of this search) is accepted. (5) Not covered here: trial checkpoints (our own files, read
with `weights_only` / safetensors by pipeline.checkpoint) and trial results (JSON/CSV data). A
failed trial's `error.pkl` is covered: Ray writes it into the trial's staging folder before the
state save that uploads it, where the signer sees it.
(6) Whoever can read the key can sign: keep it off the shared storage. Deleting the list or the
key denies a resume; it runs nothing.
"""

import hashlib
import hmac
import json
import os
import secrets

from pyarrow import fs as pafs
from ray.tune import Callback

from pipeline.config import ConfigError

KEY_ENV = "TRANSMUTE_TUNE_KEY"
SIGNATURES = "state-signatures"  # neither .json nor .pkl: Ray never copies or reads it
OWN_FILES = ("best_config.json",)  # data the project writes beside Ray's state; Ray never loads it
KEEP = 8  # versions listed per file: the one uploading and the ones before it
# the pickled exception Ray writes into a failed trial's folder; a resumed search's results
# (ResultGrid) unpickle it, so it is signed like the state
TRIAL_ERROR = "error.pkl"


class StateRefused(ConfigError):
    """The search's stored state fails the signature check; nothing of it was deserialised."""


def key_path(home: str, explicit: str | None = None) -> str:
    default = os.path.join(home, "keys", "tune-state.key")
    return os.path.expanduser(explicit or os.environ.get(KEY_ENV) or default)


def load_key(path: str, create: bool) -> bytes:
    """The signing key at `path`; made (32 random bytes, mode 0600) when `create` and missing."""
    if create and not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by a concurrent search meanwhile: use theirs
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StateRefused(
            f"tune state key {path} not found: the search cannot be verified; give the key it was "
            f"signed with (--state-key or ${KEY_ENV}), or start the search again under a new --name"
        ) from None
    if st.st_mode & 0o077 or st.st_uid != os.getuid():
        raise StateRefused(
            f"tune state key {path} must be owned by this user and private: chmod 600 {path}"
        )
    with open(path, "rb") as f:
        key = f.read()
    if len(key) < 16:
        raise StateRefused(f"tune state key {path} is shorter than 16 bytes")
    return key


def mac(key: bytes, search: str, file_name: str, data: bytes) -> str:
    return hmac.new(key, f"{search}\0{file_name}\0".encode() + data, hashlib.sha256).hexdigest()


def signed_names(names) -> list[str]:
    """The files of a search folder that Ray may deserialise: `*.pkl` and `*.json` at its top, and
    each trial folder's `error.pkl` (named `<trial folder>/error.pkl`)."""
    top = [n for n in names if "/" not in n and n.endswith((".pkl", ".json")) and n not in OWN_FILES]
    return sorted(top + [n for n in names if n.count("/") == 1 and n.endswith(f"/{TRIAL_ERROR}")])


def _search_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """The files at the top of a search folder and one level below it (the trial folders), relative."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    files = [i.base_name for i in infos if i.type == pafs.FileType.File]
    trials = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    errors = fs.get_file_info([f"{path}/{t}/{TRIAL_ERROR}" for t in trials])
    failed = [t for t, e in zip(trials, errors, strict=True) if e.type == pafs.FileType.File]
    return files + [f"{t}/{TRIAL_ERROR}" for t in failed]


def _staged_files(staged: str) -> list[str]:
    if not os.path.isdir(staged):
        return []
    names = [n for n in os.listdir(staged) if os.path.isfile(os.path.join(staged, n))]
    trials = [n for n in os.listdir(staged) if os.path.isfile(os.path.join(staged, n, TRIAL_ERROR))]
    return names + [f"{t}/{TRIAL_ERROR}" for t in trials]


def _read(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.readall()
    except FileNotFoundError:
        return None


def read_signatures(fs: pafs.FileSystem, folder: str) -> dict[str, list[str]]:
    """The MAC lists stored beside the state; anything malformed counts as nothing signed."""
    raw = _read(fs, f"{folder}/{SIGNATURES}")
    try:
        files = json.loads(raw)["files"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {k: [m for m in v if isinstance(m, str)][-KEEP:] for k, v in files.items() if isinstance(v, list)}


def write_signatures(fs: pafs.FileSystem, folder: str, files: dict[str, list[str]]) -> None:
    """One atomic write: a local file is renamed into place, an S3 object appears whole."""
    data = json.dumps({"files": files}, indent=1, sort_keys=True).encode()
    final = f"{folder}/{SIGNATURES}"
    temp = final if fs.type_name == "s3" else f"{folder}/.{SIGNATURES}.{secrets.token_hex(4)}"
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(temp) as f:
        f.write(data)
    if temp != final:
        fs.move(temp, final)


def sign(key: bytes, search: str, fs: pafs.FileSystem, folder: str, contents: dict[str, bytes]) -> None:
    """Adds the MACs of `contents` (file name -> bytes) to the folder's list."""
    files = read_signatures(fs, folder)
    for name, data in contents.items():
        digest = mac(key, search, name, data)
        versions = [m for m in files.get(name, []) if m != digest]
        files[name] = (versions + [digest])[-KEEP:]
    write_signatures(fs, folder, files)


def sign_stored(key: bytes, search: str, fs: pafs.FileSystem, folder: str, names) -> None:
    """Signs files as they are on storage now (tuner.pkl, just written by Ray)."""
    contents = {n: _read(fs, f"{folder}/{n}") for n in names}
    sign(key, search, fs, folder, {n: data for n, data in contents.items() if data is not None})


def verify(key: bytes, search: str, fs: pafs.FileSystem, folder: str) -> list[str]:
    """Checks every file Ray may deserialise from `folder` against the list; raises StateRefused
    naming the first that fails, before anything reads it as a pickle. Returns the names checked."""
    names = signed_names(_search_files(fs, folder))
    if "tuner.pkl" not in names:
        raise StateRefused(f"no search state at {folder} (tuner.pkl missing): nothing to resume")
    files = read_signatures(fs, folder)
    for name in names:
        data = _read(fs, f"{folder}/{name}")
        digest = mac(key, search, name, data) if data is not None else ""
        if not any(digest and hmac.compare_digest(digest, m) for m in files.get(name, [])):
            raise StateRefused(
                f"refusing to resume search {search!r}: {folder}/{name} is not signed with the key of this "
                f"search (Ray would unpickle it, and a pickle can run any code). Someone else may have "
                "written to the search's storage, or it was signed with another key (--state-key / "
                f"${KEY_ENV}), or it predates signing. Nothing was loaded. Inspect the folder, or start "
                "the search again under a new --name."
            )
    return names


class StateSigner(Callback):
    """A Tune callback that signs Ray's staged state on every save.

    It learns the storage and the staging folder from the trials Ray passes to its step hooks,
    and keeps neither the key nor the filesystem when pickled (it travels inside tuner.pkl)."""

    def __init__(self, search: str, key_file: str):
        self.search, self.key_file = search, key_file
        self._storage = None

    def __getstate__(self):
        return {"search": self.search, "key_file": self.key_file}

    def __setstate__(self, state):
        self.__init__(state["search"], state["key_file"])

    def _learn(self, trials) -> bool:
        first = self._storage is None and bool(trials)
        if first:
            self._storage = trials[0].storage
        return first

    def on_step_begin(self, iteration, trials, **info):
        if self._learn(trials):
            self.sign_staged()

    def on_step_end(self, iteration, trials, **info):
        if self._learn(trials):  # the first save came before any trial: sign it now
            self.sign_staged()

    def get_state(self):
        """Called by Ray inside each state save, after writing the state and before uploading it."""
        if self._storage is not None:
            self.sign_staged()
        return None  # no state of our own: Ray writes no callback file for us

    def sign_staged(self) -> None:
        staged = self._storage.experiment_driver_staging_path
        names = signed_names(_staged_files(staged))
        contents = {}
        for name in names:
            with open(os.path.join(staged, name), "rb") as f:
                contents[name] = f.read()
        key = load_key(os.environ.get(KEY_ENV) or self.key_file, create=False)
        sign(key, self.search, self._storage.storage_filesystem, self._storage.experiment_fs_path, contents)

