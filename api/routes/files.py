"""Files: upload JSONL training data, list, retrieve, download, delete."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api import files
from api.deps import AsyncProjectDep, ProjectDep, SessionDep
from api.presenters import file_public
from api.uploads import REQUEST_BODY, receive_upload
from shared import deletions
from shared.schemas import FileDeleted, FilePublic, FilesPublic

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FilePublic, openapi_extra={"requestBody": REQUEST_BODY})
async def upload_file(request: Request, project: AsyncProjectDep) -> FilePublic:
    """Upload a JSONL data set; every line is validated before it is stored."""
    return file_public(await receive_upload(request, project))


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
def file_content(file_id: str, session: SessionDep, project: ProjectDep) -> StreamingResponse:
    """Download a file's content."""
    row = files.get_file(session, file_id, project)
    media = "text/csv" if row.record_format == "csv" else "application/jsonl"
    return StreamingResponse(files.content_chunks(row), media_type=media, headers={
        "Content-Length": str(row.bytes),
        "Content-Disposition": content_disposition(row.filename)})


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, project: ProjectDep) -> FileDeleted:
    """Delete a file (409 while an unfinished job uses it)."""
    removal = files.delete_file(session, file_id, project)
    session.commit()  # first: the content goes only once the file is gone
    deletions.purge(removal)  # what the store does not take now, a worker deletes later
    return FileDeleted(id=file_id)


def content_disposition(filename: str) -> str:
    """``attachment`` with the file's name, RFC 6266's encoded form for a name that is not
    plain ASCII (as Starlette's FileResponse writes it)."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'
