# Generates the oracle files in this folder (run on a machine with torch and transformers):
#   python3 make_oracle.py <path to fixtures/models/stories260K-hf> <output dir>
# It writes torch/*.bin, torch/*.safetensors and oracle.json; transformers_oracle.json holds oracle.json's
# RoPE values and the chat renders, re-keyed. Run on the H200 device machine, 2026-11-28 (torch 2.11.0+cu130,
# transformers 5.17.0, safetensors 0.8.0). The save_pretrained(safe_serialization=False) step wrote safetensors
# under transformers 5, so no HF-written pytorch_model.bin came back; the torch.save files are the .bin oracles.
import torch,json,os,sys,traceback
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM as M,AutoTokenizer as T,LlamaConfig as C
D=sys.argv[1];O=sys.argv[2];os.chdir(O);r={}
def tr(f):
 try:f()
 except Exception:traceback.print_exc()
def bins():
 m=M.from_pretrained(D,dtype=torch.float32);m.save_pretrained('teacher_bin',safe_serialization=False)
 torch.manual_seed(0);w=torch.randn(3,4);b=torch.randn(10)
 t={'f32':torch.randn(3,4),'f16':torch.randn(5).half(),'bf16':torch.randn(2,3).bfloat16(),'i64':torch.arange(7),'i32':torch.arange(-3,3,dtype=torch.int32),'tr':torch.randn(4,3).t(),'sl':b[2:5],'sa':w,'sb':w,'sc':torch.tensor(3.5),'bool':torch.tensor([True,False]),'u8':torch.tensor([1,255],dtype=torch.uint8),'f64':torch.randn(3,dtype=torch.float64)}
 torch.save(t,'tensors.bin');p={'p':torch.nn.Parameter(torch.randn(2))};torch.save(p,'param.bin')
 torch.save({'a':torch.randn(2)},'legacy.bin',_use_new_zipfile_serialization=False)
 e={k:(v.detach().float() if v.is_floating_point() else v.long()).contiguous().clone() for k,v in {**t,**p}.items()}
 save_file(e,'tensors_expected.safetensors')
def dt():
 torch.manual_seed(1);s=[torch.randn(2000)*k for k in (1e-6,1e-3,1,100,1e4)]
 s.append(torch.tensor([0.,-0.,65504,65519,65520,1e5,float('inf'),-float('inf'),float('nan'),2**-24,2**-25,3*2**-26,2**-14,1+2**-11,1+3*2**-11,1+2**-8,1+3*2**-8,5e-41,-3e-39]))
 x=torch.cat(s);save_file({'x':x,'f16':x.half(),'bf16':x.bfloat16()},'torch_dtypes.safetensors')
def rope():
 from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as E
 for n,kw in (('llama3',dict(hidden_size=2048,num_attention_heads=32,head_dim=64,rope_theta=5e5,max_position_embeddings=131072,rope_scaling={'rope_type':'llama3','factor':32.,'low_freq_factor':1.,'high_freq_factor':4.,'original_max_position_embeddings':8192})),('linear',dict(hidden_size=64,num_attention_heads=8,head_dim=8,rope_theta=1e4,rope_scaling={'rope_type':'linear','factor':4.})),('default',dict(hidden_size=128,num_attention_heads=8,head_dim=16,rope_theta=1e6))):
  e=E(config=C(**kw));r['rope_'+n]=[e.inv_freq.float().view(torch.int32).tolist(),float(e.attention_scaling)]
def tpl():
 k=T.from_pretrained(D)
 F="{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n\\n' }}{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
 Z="{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
 ms=[{'role':'system','content':'Be kind.'},{'role':'user','content':'Tell me a story.'},{'role':'assistant','content':'Once upon a time.'},{'role':'user','content':'More!'}]
 for n,tp in (('f',F),('z',Z)):
  for g in (0,1):
   s=k.apply_chat_template(ms,chat_template=tp,tokenize=False,add_generation_prompt=bool(g));r[n+str(g)]=[s,k(s,add_special_tokens=False).input_ids]

for f in (bins,dt,rope,tpl):tr(f)
json.dump(r,open('oracle.json','w'))
import transformers,safetensors;print(torch.__version__,transformers.__version__,safetensors.__version__)
