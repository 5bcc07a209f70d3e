"""Files: upload JSONL training data, list, retrieve, download, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import FileResponse

from api.deps import ProjectDep, SessionDep
from shared import files
from shared.models import File
from shared.schemas import FileDeleted, FilePublic, FilesPublic

router = APIRouter(prefix="/v1/files", tags=["files"])


def _public(row: File) -> FilePublic:
    return FilePublic(id=row.id, bytes=row.bytes, created_at=row.created_at,
                      filename=row.filename, purpose=row.purpose, status=row.status,
                      line_count=row.line_count, record_format=row.record_format)


@router.post("", response_model=FilePublic)
def upload_file(
    session: SessionDep, project: ProjectDep, file: UploadFile,
    purpose: Annotated[str, Form()] = "fine-tune",
) -> FilePublic:
    """Upload a JSONL data set; every line is validated before it is stored."""
    row = files.save_upload(session, file.file, file.filename or "upload.jsonl", purpose, project)
    return _public(row)


@router.get("", response_model=FilesPublic)
def list_files(
    session: SessionDep, project: ProjectDep, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100, purpose: str | None = None,
) -> FilesPublic:
    """List uploaded files, newest first."""
    rows, more = files.list_files(session, project, after, limit)
    return FilesPublic(data=[_public(r) for r in rows if purpose in (None, r.purpose)],
                       has_more=more)


@router.get("/{file_id}", response_model=FilePublic)
def retrieve_file(file_id: str, session: SessionDep, project: ProjectDep) -> FilePublic:
    """Retrieve a file's metadata."""
    return _public(files.get_file(session, file_id, project))


@router.get("/{file_id}/content")
def file_content(file_id: str, session: SessionDep, project: ProjectDep) -> FileResponse:
    """Download a file's content."""
    row = files.get_file(session, file_id, project)
    return FileResponse(files.open_content(row), media_type="application/jsonl",
                        filename=row.filename)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, project: ProjectDep) -> FileDeleted:
    """Delete a file (409 while an unfinished job uses it)."""
    files.delete_file(session, file_id, project)
    return FileDeleted(id=file_id)
