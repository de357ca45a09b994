"""Publishing trained adapters to the Hugging Face Hub: what is uploaded, retries, and errors that say what to do.

Used by `DiffusionNFTTrainer.push_to_hub`, the pushes during training (`save_steps` with `push_to_hub=True`) and
`trl-nft push RUN_DIR --repo_id USER/NAME`. Everything goes through `huggingface_hub.HfApi` (`create_repo`,
`upload_folder`), so `HF_ENDPOINT` and `HF_TOKEN` work as everywhere in the ecosystem.
"""

from __future__ import annotations

import logging
import os
import time

from huggingface_hub import HfApi


logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Seconds to wait before the 2nd, 3rd, ... attempt of a final push (network errors and 5xx answers only).
PUSH_RETRY_WAITS: tuple[float, ...] = (2.0, 8.0)


class PushToHubError(RuntimeError):
    """A push to the Hub failed; the message names the endpoint, the repo and where the local files are."""


def publish_patterns(denoiser_name: str = "transformer") -> list[str]:
    """The files of a run folder that go to the Hub: the adapter (or the fine-tuned denoiser's folder), the card and
    its images. Checkpoint folders, `training_args.bin` and logs stay local."""
    return [LORA_WEIGHT_NAME, f"{denoiser_name}/*", "README.md", "images/*"]


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def describe_error(err: BaseException, *, api: HfApi, repo_id: str | None, folder: str | None, action: str) -> str:
    """A message for a failed Hub call: what failed, against which endpoint, the likely fix, and that nothing local
    was removed."""
    where = f"{api.endpoint}/{repo_id}" if repo_id else api.endpoint
    status = _status(err)
    if status in (401, 403):
        hint = (
            "The Hub refused the token: log in with `hf auth login` or set HF_TOKEN to a token with write access"
            + (f" to {repo_id}" if repo_id else "")
            + "."
        )
    elif status is not None:
        hint = f"The Hub answered HTTP {status}."
    else:
        hint = f"Could not reach {api.endpoint} ({type(err).__name__}); check the network or HF_ENDPOINT."
    local = (
        f" Nothing local was removed: the files are in {os.path.abspath(folder)}; publish them later with "
        f"`trl-nft push {folder} --repo_id {repo_id or 'USER/NAME'}`."
        if folder
        else ""
    )
    return f"{action} {where} failed: {hint}{local}\n  cause: {err}"


def create_repo(api: HfApi, repo_id: str, *, private: bool | None, token=None, folder: str | None = None) -> str:
    """`HfApi.create_repo(exist_ok=True)`; returns the full `namespace/name` id. Raises `PushToHubError`."""
    try:
        return api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    except Exception as err:
        raise PushToHubError(
            describe_error(err, api=api, repo_id=repo_id, folder=folder, action="Creating the repo")
        ) from err


def upload_run(
    api: HfApi,
    folder: str,
    repo_id: str,
    *,
    commit_message: str,
    denoiser_name: str = "transformer",
    token=None,
    revision: str | None = None,
    retry_waits: tuple[float, ...] | None = None,
):
    """Upload the publishable files of `folder` (`publish_patterns`) in one commit, retrying network errors and 5xx
    answers after `retry_waits` seconds (defaults to `PUSH_RETRY_WAITS`). Returns the `CommitInfo`.

    Raises:
        `PushToHubError`: after the last attempt, or at once on a 4xx answer (a bad token is not retried).
    """
    waits = PUSH_RETRY_WAITS if retry_waits is None else retry_waits
    for attempt in range(len(waits) + 1):
        try:
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                allow_patterns=publish_patterns(denoiser_name),
                commit_message=commit_message,
                token=token,
                revision=revision,
            )
        except Exception as err:
            status = _status(err)
            final = attempt == len(waits) or (status is not None and 400 <= status < 500)
            if final:
                tries = f" (attempt {attempt + 1} of {len(waits) + 1})" if attempt else ""
                raise PushToHubError(
                    describe_error(err, api=api, repo_id=repo_id, folder=folder, action=f"Uploading to{tries}")
                ) from err
            logger.warning(
                f"Upload to {api.endpoint}/{repo_id} failed ({type(err).__name__}: {err}); "
                f"retrying in {waits[attempt]:g} s."
            )
            time.sleep(waits[attempt])


def push_run(
    run_dir: str,
    repo_id: str,
    *,
    private: bool | None = None,
    token=None,
    revision: str | None = None,
    commit_message: str = "Upload DiffusionNFT adapter",
):
    """Publish a finished run folder (what `trl-nft push` does): create the repo, point the card's snippet at it, and
    upload the adapter, the card and its images. Returns the `CommitInfo`.

    Raises:
        `FileNotFoundError`: `run_dir` holds no adapter.
        `PushToHubError`: the Hub refused or could not be reached.
    """
    from .model_card import set_card_repo_id

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a folder: pass the output_dir of a finished run.")
    denoisers = [d for d in ("transformer", "unet") if os.path.isdir(os.path.join(run_dir, d))]
    if not os.path.isfile(os.path.join(run_dir, LORA_WEIGHT_NAME)) and not denoisers:
        raise FileNotFoundError(
            f"{run_dir} holds no adapter ({LORA_WEIGHT_NAME}) and no fine-tuned denoiser folder: pass the output_dir "
            "of a run after `trainer.save_model()` (or a checkpoint-N folder)."
        )
    api = HfApi()
    full_id = create_repo(api, repo_id, private=private, token=token, folder=run_dir)
    card = os.path.join(run_dir, "README.md")
    if os.path.isfile(card):
        set_card_repo_id(card, full_id)
    return upload_run(
        api,
        run_dir,
        full_id,
        commit_message=commit_message,
        denoiser_name=denoisers[0] if denoisers else "transformer",
        token=token,
        revision=revision,
    )
