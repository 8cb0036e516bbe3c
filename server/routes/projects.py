"""/projects: admin only."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from rankguard.server.deps import AdminPrincipal, DbDep
from rankguard.server.middleware import WireRoute
from rankguard.server.schemas import ProjectCreate, ProjectPublic, ProjectsPublic
from rankguard.server.storage.runs import ensure_project, get_project, list_projects

router = APIRouter(route_class=WireRoute, prefix="/projects", tags=["projects"])


@router.get("", response_model=ProjectsPublic)
def read_projects(db: DbDep, principal: AdminPrincipal) -> ProjectsPublic:
    """List the projects the admin token can see."""
    with db.read() as session:
        projects = [
            ProjectPublic.model_validate(p)
            for p in list_projects(session=session)
            if principal.can_access(p.id)
        ]
    return ProjectsPublic(data=projects, count=len(projects))


@router.post("", response_model=ProjectPublic, status_code=status.HTTP_201_CREATED)
def create_project(body: ProjectCreate, db: DbDep, principal: AdminPrincipal) -> ProjectPublic:
    """Create a project (needs the bootstrap admin token: project admins stay in theirs)."""
    if principal.project_id is not None:
        raise HTTPException(403, detail="only an unbound admin token can create projects")
    with db.write() as session:
        if get_project(session=session, name=body.name) is not None:
            raise HTTPException(409, detail=f"project {body.name!r} already exists")
        project = ensure_project(session=session, name=body.name)
        return ProjectPublic.model_validate(project)
