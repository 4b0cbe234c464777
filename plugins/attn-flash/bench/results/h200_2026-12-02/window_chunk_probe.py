# ruff: noqa
# As run on 2026-12-02 for window_chunk_launch_order.log and bwd_only_fixed_cost.log (compact probe, kept as run).
import sys,time,numpy as np,jax,jax.numpy as jnp,jaxattn
from jaxattn import ChunkedCausalMask,OperationMetadata
import jaxattn_flash.mosaic_kernels as MK,jaxattn_flash.mosaic_bwd_kernels as MB
b,s,hq,hk,d=1,32768,32,8,128
ks=jax.random.split(jax.random.key(0),4)
q=jax.random.normal(ks[0],(b,s,hq,d),jnp.bfloat16);k=jax.random.normal(ks[1],(b,s,hk,d),jnp.bfloat16)
v=jax.random.normal(ks[2],(b,s,hk,d),jnp.bfloat16);do=jax.random.normal(ks[3],(b,s,hq,d),jnp.bfloat16)
def T(f,*a):
  jax.block_until_ready(f(*a));jax.block_until_ready(f(*a));r=[]
  for _ in range(5):
    t=time.perf_counter()
    for _ in range(10):o=f(*a)
    jax.block_until_ready(o);r.append((time.perf_counter()-t)/10)
  return np.median(r)*1e3
M={'causal':{'is_causal':True},'window':{'is_causal':True,'sliding_window':4096},'chunk':{'mask':ChunkedCausalMask(8192)}}
def G(kw,cfg):
  md=OperationMetadata(operation_configs={'flash':cfg})
  def loss(q,k,v,do):return jnp.sum(jaxattn.attention(q,k,v,backend='flash',metadata=md,**kw).astype(jnp.float32)*do.astype(jnp.float32))
  return jax.jit(jax.grad(loss,argnums=(0,1,2)))
def F(kw,cfg):
  md=OperationMetadata(operation_configs={'flash':cfg})
  return jax.jit(lambda q,k,v:jaxattn.attention(q,k,v,backend='flash',metadata=md,**kw))
def run(n,m,cfg,fwd=0):
  try:t=T(F(M[m],cfg),q,k,v) if fwd else T(G(M[m],cfg),q,k,v,do);print(f"{n:36s} {t:8.3f} ms",flush=True)
  except Exception as e:print(n,'FAIL',str(e)[:300],flush=True)
def B(n,lo,hi,ch):
  sp=MB.MosaicBwdSpec(scale=d**-.5,band_lo=lo,band_hi=hi,fused_dq='split',chunk=ch)
  lse=jnp.zeros((b,hq,s),jnp.float32)
  f=jax.jit(lambda *a:MB.mosaic_backward(sp,*a));print(f"{'bwd-only '+n:36s} {T(f,q,k,v,do,lse,lse):8.3f} ms",flush=True)
S=(('diag',0,0,None),('window',-4096,0,None),('chunk',None,0,8192),('causal',None,0,None))
if sys.argv[1]=='a':
  for m in M:run(m+' fwd',m,{},1);run(m+' fwdbwd',m,{})
  for m in ('window','chunk'):
    run(m+' fwdbwd triton-bwd',m,{'gpu_backward':'triton'});run(m+' fwdbwd cl_dkv8',m,{'launch_cluster_dkv':8})
  MK.heavy_first=lambda *a:True;jax.clear_caches()
  for m in ('window','chunk'):
    run(m+' fwd rev cl8',m,{'launch_cluster_fwd':8},1);run(m+' fwdbwd rev cl8+cl_dkv8',m,{'launch_cluster_fwd':8,'launch_cluster_dkv':8})
else:
  for x in S:B(*x)
  MB.q_full_range=lambda sp,c,bq,lb,ub,kv_end=None:(ub,ub);jax.clear_caches()
  for x in S[1:]:B(x[0]+' ALL-MASKED',*x[1:])
