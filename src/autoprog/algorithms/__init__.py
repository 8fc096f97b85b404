"""The paper's pieces, task-agnostic: growth operators (MoGrow), the elastic supernet, AutoProg-One,
AutoProg-Zero and the zero-shot proxies. They decide or compute; trainers and adapters apply."""
