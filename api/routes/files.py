"""Files: upload JSONL training data, list, retrieve, download, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import FileResponse

from api import files
from api.deps import ProjectDep, SessionDep
from api.presenters import file_public
from shared.files import open_content
from shared.schemas import FileDeleted, FilePublic, FilesPublic

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FilePublic)
def upload_file(
    session: SessionDep, project: ProjectDep, file: UploadFile,
    purpose: Annotated[str, Form()] = "fine-tune",
) -> FilePublic:
    """Upload a JSONL data set; every line is validated before it is stored."""
    row = files.save_upload(session, file.file, file.filename or "upload.jsonl", purpose, project)
    return file_public(row)


@router.get("", response_model=FilesPublic)
def list_files(
    session: SessionDep, project: ProjectDep, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100, purpose: str | None = None,
) -> FilesPublic:
    """List uploaded files, newest first."""
    rows, more = files.list_files(session, project, after, limit, purpose)
    return FilesPublic(data=[file_public(r) for r in rows], has_more=more)


@router.get("/{file_id}", response_model=FilePublic)
def retrieve_file(file_id: str, session: SessionDep, project: ProjectDep) -> FilePublic:
    """Retrieve a file's metadata."""
    return file_public(files.get_file(session, file_id, project))


@router.get("/{file_id}/content")
def file_content(file_id: str, session: SessionDep, project: ProjectDep) -> FileResponse:
    """Download a file's content."""
    row = files.get_file(session, file_id, project)
    media = "text/csv" if row.record_format == "csv" else "application/jsonl"
    return FileResponse(open_content(row), media_type=media, filename=row.filename)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, project: ProjectDep) -> FileDeleted:
    """Delete a file (409 while an unfinished job uses it)."""
    files.delete_file(session, file_id, project)
    return FileDeleted(id=file_id)
